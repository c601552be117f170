//! Generate one image from an exported model directory in your own program.
//!
//! cargo run -p dalle-runtimes --example embed -- runs/model "a red circle" out.png

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, prompt, out] = &args[..] else {
        return Err("usage: embed MODEL_DIR PROMPT OUT.png".into());
    };
    let kind = dalle_runtimes::RuntimeKind::Tract;
    let generator = dalle_runtimes::open(model.as_ref(), kind, &Default::default())?;
    let request = dalle_runtimes::Request::new(prompt.as_str())
        .seed(0)
        .top_k(64);
    let image = generator.generate(&request)?.images.remove(0);
    image::RgbImage::from_raw(image.width, image.height, image.rgb)
        .ok_or("bad image buffer")?
        .save(out)?;
    println!("wrote {out}");
    Ok(())
}
