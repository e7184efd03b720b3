//! Real-model check: mlbench's f32 forward over the HF folder that `model import` wrote,
//! against candle-transformers' quantized Gemma 3 forward over the original GGUF, on real
//! text. Reports how often the next-token argmax agrees (goal: at least 95% of positions).
//! Run: cargo run --release --features gguf-reference --example gguf_agreement -- \
//!        ~/.cache/mlbench/gemma-3-270m-q4_k_m.gguf models/gemma-3-270m

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor, D};
use candle_transformers::models::quantized_gemma3::ModelWeights;
use mlbench::model::transformer::Ctx;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let gguf = &args[1];
    let folder = &args[2];
    let m = mlbench::model::load(folder, DType::F32, &Device::Cpu)?;
    let texts = [
        "The capital of France is Paris, a city known for its museums, its cafés and the river Seine that crosses it from east to west.",
        "La capitale de la France est Paris, une ville connue pour ses musées, ses cafés et la Seine qui la traverse d'est en ouest.",
        "Die Hauptstadt von Deutschland ist Berlin. Die Stadt ist bekannt für ihre Geschichte, ihre Museen und ihre vielen Parks.",
        "Mji mkuu wa Tanzania ni Dodoma, ingawa Dar es Salaam ndio jiji kubwa zaidi na kitovu cha biashara nchini.",
    ];
    let (mut agree, mut agree5, mut total) = (0usize, 0usize, 0usize);
    for text in texts {
        let ids = m.tok.encode(text)?;
        let t = ids.len();
        let h = m.model.hidden(
            std::slice::from_ref(&ids),
            &[vec![1u8; t]],
            &Ctx::eval(None),
        )?;
        let rows: Vec<u32> = (0..t as u32).collect();
        let our_logits = m.model.logits_at(&h, &rows)?;
        let ours: Vec<u32> = our_logits.argmax(D::Minus1)?.to_vec1()?;
        let our_rows: Vec<Vec<f32>> = our_logits.to_vec2()?;
        let mut file = std::fs::File::open(gguf)?;
        let content = gguf_file::Content::read(&mut file)?;
        let mut q = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
        let mut same = 0;
        let mut top5 = 0;
        for (pos, &id) in ids.iter().enumerate() {
            let x = Tensor::new(&[id], &Device::Cpu)?.unsqueeze(0)?;
            let logits = q.forward(&x, pos)?;
            let theirs: u32 = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar()?;
            same += usize::from(theirs == ours[pos]);
            // Where they differ: is the reference's choice among our top 5?
            let row = &our_rows[pos];
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            top5 += usize::from(idx[..5].contains(&(theirs as usize)));
        }
        println!(
            "{:>3}/{:<3} positions agree: {}",
            same,
            t,
            &text[..40.min(text.len())]
        );
        agree += same;
        agree5 += top5;
        total += t;
    }
    println!(
        "next-token argmax agreement: {agree}/{total} = {:.1}%",
        100.0 * agree as f64 / total as f64
    );
    println!(
        "reference argmax within mlbench's top 5: {agree5}/{total} = {:.1}%",
        100.0 * agree5 as f64 / total as f64
    );
    Ok(())
}
