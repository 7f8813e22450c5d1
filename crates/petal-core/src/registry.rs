//! The method registry: one line per method.

use crate::adapter::AdapterMethod;
use crate::methods;

pub static METHODS: &[&dyn AdapterMethod] = &[
    &methods::lora::Lora,
    &methods::adalora::AdaLora,
    &methods::loha::Loha,
    &methods::lokr::Lokr,
    &methods::ia3::Ia3,
    &methods::prompt_tuning::PromptTuning,
    &methods::prefix_tuning::PrefixTuning,
    &methods::p_tuning::PTuning,
    &methods::ln_tuning::LnTuning,
    &methods::bitfit::Bitfit,
    &methods::oft::Oft,
    &methods::boft::Boft,
    &methods::road::Road,
    &methods::vera::Vera,
    &methods::ssf::Ssf,
    &methods::fedins::FedIns,
    &methods::kradapter::KrAdapter,
    &methods::l4q::L4q,
    &methods::quanta::Quanta,
    &methods::paca::Paca,
    &methods::chain_of_lora::ChainOfLora,
    &methods::rosa::Rosa,
    &methods::fish::Fish,
    &methods::intrinsic::Intrinsic,
    &methods::rps::Rps,
    &methods::mos::Mos,
    &methods::mov::Mov,
    &methods::molora::Molora,
    &methods::sira::Sira,
    &methods::ks_lottery::KsLottery,
    &methods::palora::Palora,
    &methods::pasta::Pasta,
    &methods::kv_prompt::KvPrompt,
];

/// Look a method up by its PEFT `peft_type` (case-insensitive: "LORA", "lora").
pub fn method(peft_type: &str) -> Option<&'static dyn AdapterMethod> {
    METHODS
        .iter()
        .copied()
        .find(|m| m.peft_type().eq_ignore_ascii_case(peft_type))
}
