pub mod loha;
pub mod lora;
