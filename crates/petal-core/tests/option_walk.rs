//! Every option of every registered method, walked with values of the wrong kind: each is
//! either a value the option takes, or refused by validation in one line that names the
//! option's key (never another key, never a panic). Every option refuses at least one of them.

use petal_core::registry::METHODS;
use petal_core::AdapterConfig;
use serde_json::{json, Value};

/// Values of every JSON kind, and numbers outside every range an option could have.
fn candidates() -> Vec<Value> {
    vec![
        json!({"not": ["an", "option", "value"]}),
        json!("??not-a-value??"),
        json!(-1),
        json!(-0.5),
        json!(1.5),
        json!(1e300),
        json!(18446744073709551615u64),
        json!(true),
        json!([[-1]]),
    ]
}

#[test]
fn every_option_refuses_bad_values_naming_its_key() {
    let (mut walked, mut named) = (0, 0);
    for m in METHODS {
        for opt in m.options().keys {
            let mut refused = 0;
            for v in candidates() {
                let mut cfg = AdapterConfig::new(m.peft_type()).unwrap();
                cfg.set_init_nonzero();
                // what a method needs from its data (PaLoRA's tasks, PASTA's special tokens)
                for (k, v) in m.bench_settings().unwrap_or(&[]) {
                    cfg.set(k, petal_core::config::parse_value(v)).unwrap();
                }
                if cfg.set(opt.key, v.clone()).is_err() {
                    refused += 1;
                    continue;
                }
                let Err(e) = cfg.validate("adapter_config.json") else {
                    continue;
                };
                let e = e.to_string();
                assert!(
                    e.contains(&format!("`{}`", opt.key)) && e.lines().count() == 1,
                    "{} {} = {v}: the error names another key: {e}",
                    m.peft_type(),
                    opt.key
                );
                named += 1;
                refused += 1;
            }
            assert!(
                refused > 0,
                "{} {}: takes every value of every kind",
                m.peft_type(),
                opt.key
            );
            walked += 1;
        }
    }
    assert!(walked > 60, "only {walked} options walked");
    assert!(
        named > 4 * walked,
        "{named} refusals checked by validation for {walked} options"
    );
}
