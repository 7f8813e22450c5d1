pub mod lora;
