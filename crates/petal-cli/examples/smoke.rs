fn main() -> anyhow::Result<()> {
    let p = petal_cli::assets::ensure("smollm2")?;
    let t = std::time::Instant::now();
    let m = petal_models::load_model(
        p.to_str().unwrap(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    eprintln!("loaded in {:?}", t.elapsed());
    let tmpl = m.tokenizer.chat_template.as_ref().unwrap();
    let text = tmpl.render(
        &[petal_data::template::Message {
            role: "user".into(),
            content: "What is the capital of France?".into(),
        }],
        true,
    )?;
    let ids = m.tokenizer.encode(&text, true)?;
    eprintln!("{} prompt tokens: {:?}", ids.len(), &ids[..10]);
    let p = petal_serve::SamplingParams {
        max_new_tokens: 20,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let g = petal_serve::generate(&m.model, &m.tokenizer, &ids, &p, &mut |s| eprint!("{s}"))?;
    eprintln!("\n{:?} {:?} in {:?}", g.stop, g.text, t.elapsed());
    Ok(())
}
