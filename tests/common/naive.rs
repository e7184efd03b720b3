//! An independent, deliberately plain reference forward pass (f64 loops over `Vec`s) for the
//! tiny models, written from the architecture descriptions (HF transformers' Gemma 3 and Llama
//! modelling), not from mlbench's transformer code. Used to check the candle decoder.

#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::Tensor;
use mlbench::model::config::{Arch, LayerKind, ModelConfig};

pub struct Naive {
    pub c: ModelConfig,
    pub w: BTreeMap<String, (Vec<f64>, Vec<usize>)>,
    /// module -> (A [r,in], B [out,r], scaling)
    pub lora: BTreeMap<String, (Vec<f64>, Vec<f64>, usize, f64)>,
}

fn to_vec(t: &Tensor) -> (Vec<f64>, Vec<usize>) {
    let v: Vec<f64> = t
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    (v, t.dims().to_vec())
}

impl Naive {
    pub fn new(c: ModelConfig, tensors: &BTreeMap<String, Tensor>) -> Self {
        Naive {
            c,
            w: tensors
                .iter()
                .map(|(k, v)| (k.clone(), to_vec(v)))
                .collect(),
            lora: BTreeMap::new(),
        }
    }

    pub fn add_lora(&mut self, module: &str, a: &Tensor, b: &Tensor, scaling: f64) {
        let (av, ad) = to_vec(a);
        let (bv, _) = to_vec(b);
        self.lora
            .insert(module.to_string(), (av, bv, ad[0], scaling));
    }

    fn get(&self, n: &str) -> &Vec<f64> {
        &self.w.get(n).unwrap_or_else(|| panic!("no tensor {n}")).0
    }

    /// y = W x (+ b) + s * B (A x), for one vector x.
    fn linear(&self, module: &str, x: &[f64]) -> Vec<f64> {
        let (w, shape) = &self.w[&format!("{module}.weight")];
        let (out, inp) = (shape[0], shape[1]);
        let mut y: Vec<f64> = (0..out)
            .map(|o| (0..inp).map(|i| w[o * inp + i] * x[i]).sum())
            .collect();
        if let Some((b, _)) = self.w.get(&format!("{module}.bias")) {
            for o in 0..out {
                y[o] += b[o];
            }
        }
        if let Some((a, b, r, s)) = self.lora.get(module) {
            let ax: Vec<f64> = (0..*r)
                .map(|k| (0..inp).map(|i| a[k * inp + i] * x[i]).sum())
                .collect();
            for o in 0..out {
                y[o] += s * (0..*r).map(|k| b[o * r + k] * ax[k]).sum::<f64>();
            }
        }
        y
    }

    fn norm(&self, name: &str, x: &[f64]) -> Vec<f64> {
        let w = self.get(name);
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let inv = 1.0 / (ms + self.c.rms_norm_eps).sqrt();
        let gemma = self.c.arch == Arch::Gemma3;
        x.iter()
            .zip(w)
            .map(|(v, g)| v * inv * if gemma { 1.0 + g } else { *g })
            .collect()
    }

    fn rope(&self, x: &mut [f64], pos: usize, base: f64) {
        let hd = x.len();
        let half = hd / 2;
        let orig = x.to_vec();
        for j in 0..half {
            let ang = pos as f64 / base.powf((2 * j) as f64 / hd as f64);
            let (s, c) = ang.sin_cos();
            x[j] = orig[j] * c - orig[j + half] * s;
            x[j + half] = orig[j + half] * c + orig[j] * s;
        }
    }

    /// Logits `[T][vocab]` of one unpadded sequence.
    pub fn logits(&self, ids: &[u32]) -> Vec<Vec<f64>> {
        let c = &self.c;
        let (h, hd, nh, nkv) = (
            c.hidden_size,
            c.head_dim,
            c.num_attention_heads,
            c.num_key_value_heads,
        );
        let emb = self.get("model.embed_tokens.weight");
        let gemma = c.arch == Arch::Gemma3;
        let mut xs: Vec<Vec<f64>> = ids
            .iter()
            .map(|&t| {
                let row = &emb[t as usize * h..(t as usize + 1) * h];
                // Gemma scales by sqrt(hidden) rounded to f32, as transformers does in f32.
                let s = if gemma {
                    f64::from((h as f32).sqrt())
                } else {
                    1.0
                };
                row.iter().map(|v| v * s).collect()
            })
            .collect();
        let n = ids.len();
        for li in 0..c.num_hidden_layers {
            let p = format!("model.layers.{li}");
            let base = c.rope_base(li);
            let window = if c.layer_kinds[li] == LayerKind::Sliding {
                c.sliding_window
            } else {
                None
            };
            let hs: Vec<Vec<f64>> = xs
                .iter()
                .map(|x| self.norm(&format!("{p}.input_layernorm.weight"), x))
                .collect();
            let mut q: Vec<Vec<Vec<f64>>> = Vec::new();
            let mut k: Vec<Vec<Vec<f64>>> = Vec::new();
            let mut v: Vec<Vec<Vec<f64>>> = Vec::new();
            for (t, hx) in hs.iter().enumerate() {
                let qf = self.linear(&format!("{p}.self_attn.q_proj"), hx);
                let kf = self.linear(&format!("{p}.self_attn.k_proj"), hx);
                let vf = self.linear(&format!("{p}.self_attn.v_proj"), hx);
                let mut qh: Vec<Vec<f64>> =
                    (0..nh).map(|i| qf[i * hd..(i + 1) * hd].to_vec()).collect();
                let mut kh: Vec<Vec<f64>> = (0..nkv)
                    .map(|i| kf[i * hd..(i + 1) * hd].to_vec())
                    .collect();
                if gemma {
                    qh = qh
                        .iter()
                        .map(|x| self.norm(&format!("{p}.self_attn.q_norm.weight"), x))
                        .collect();
                    kh = kh
                        .iter()
                        .map(|x| self.norm(&format!("{p}.self_attn.k_norm.weight"), x))
                        .collect();
                }
                for x in qh.iter_mut().chain(kh.iter_mut()) {
                    self.rope(x, t, base);
                }
                q.push(qh);
                k.push(kh);
                v.push(
                    (0..nkv)
                        .map(|i| vf[i * hd..(i + 1) * hd].to_vec())
                        .collect(),
                );
            }
            let scale = match c.query_pre_attn_scalar {
                Some(s) => 1.0 / s.sqrt(),
                None => 1.0 / (hd as f64).sqrt(),
            };
            let mut new_xs = Vec::with_capacity(n);
            for t in 0..n {
                let mut att = vec![0.0; nh * hd];
                for head in 0..nh {
                    let kvh = head / (nh / nkv);
                    let keys: Vec<usize> = (0..=t)
                        .filter(|&s| window.is_none_or(|w| t - s < w))
                        .collect();
                    let sc: Vec<f64> = keys
                        .iter()
                        .map(|&s| {
                            scale * (0..hd).map(|d| q[t][head][d] * k[s][kvh][d]).sum::<f64>()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, &s) in keys.iter().enumerate() {
                        for d in 0..hd {
                            att[head * hd + d] += e[j] / z * v[s][kvh][d];
                        }
                    }
                }
                let o = self.linear(&format!("{p}.self_attn.o_proj"), &att);
                let x = &xs[t];
                let mid: Vec<f64> = if gemma {
                    let on = self.norm(&format!("{p}.post_attention_layernorm.weight"), &o);
                    x.iter().zip(&on).map(|(a, b)| a + b).collect()
                } else {
                    x.iter().zip(&o).map(|(a, b)| a + b).collect()
                };
                let pre = if gemma {
                    self.norm(&format!("{p}.pre_feedforward_layernorm.weight"), &mid)
                } else {
                    self.norm(&format!("{p}.post_attention_layernorm.weight"), &mid)
                };
                let g = self.linear(&format!("{p}.mlp.gate_proj"), &pre);
                let u = self.linear(&format!("{p}.mlp.up_proj"), &pre);
                let act: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| {
                        let a = if gemma {
                            0.5 * g
                                * (1.0
                                    + ((2.0 / std::f64::consts::PI).sqrt()
                                        * (g + 0.044715 * g * g * g))
                                        .tanh())
                        } else {
                            g / (1.0 + (-g).exp())
                        };
                        a * u
                    })
                    .collect();
                let d = self.linear(&format!("{p}.mlp.down_proj"), &act);
                let d = if gemma {
                    self.norm(&format!("{p}.post_feedforward_layernorm.weight"), &d)
                } else {
                    d
                };
                new_xs.push(mid.iter().zip(&d).map(|(a, b)| a + b).collect());
            }
            xs = new_xs;
        }
        let emb_rows = c.vocab_size;
        xs.iter()
            .map(|x| {
                let xn = self.norm("model.norm.weight", x);
                (0..emb_rows)
                    .map(|r| (0..h).map(|i| emb[r * h + i] * xn[i]).sum())
                    .collect()
            })
            .collect()
    }
}
