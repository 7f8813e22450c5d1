pub mod loha;
pub mod lokr;
pub mod lora;
