pub mod dora;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
