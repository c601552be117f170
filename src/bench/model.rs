//! The model a benchmark runs: a model directory given by the user, or a preset with random
//! weights exported into a temporary directory that is removed afterwards.

use crate::config::Config;
use crate::export::{dvae_spec, to_weights, transformer_spec};
use crate::{Error, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use dalle_export::{ExportInput, ExportOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model directory; a temporary one (with its work files) is deleted when this is dropped.
pub struct BenchModel {
    pub dir: PathBuf,
    cleanup: Option<PathBuf>,
}

impl Drop for BenchModel {
    fn drop(&mut self) {
        if let Some(root) = &self.cleanup {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

impl BenchModel {
    pub fn existing(dir: &Path) -> Self {
        BenchModel {
            dir: dir.to_path_buf(),
            cleanup: None,
        }
    }

    /// `preset` with random weights (GPT-2's initialisation for the transformer, the dVAE's own
    /// initialisation), exported with the default options in `dtype`; `grid` replaces the
    /// preset's image grid (the image side scales with it, same pixels per token).
    pub fn random(
        preset: &str,
        seed: u64,
        grid: Option<usize>,
        dtype: dalle_runtimes::Dtype,
    ) -> Result<Self> {
        let mut cfg = Config::preset(preset)?;
        if let Some(grid) = grid {
            let g = &mut cfg.geometry;
            g.image_size = g.image_size / g.grid * grid;
            g.grid = grid;
            cfg.validate()?;
        }
        let work =
            std::env::temp_dir().join(format!("dalle-bench-{}-{preset}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        // From here on the work dir is removed whatever fails.
        let model = BenchModel {
            dir: work.join("model"),
            cleanup: Some(work.clone()),
        };
        let dev = Device::Cpu;
        let (vae_vars, _, _) = crate::vae::train::new_model(&cfg, seed, &dev)?;
        let (encoder, decoder) = crate::vae::io::split_prefixed(&tensors(&vae_vars));
        let tf_vars = VarMap::new();
        crate::transformer::Transformer::new(
            &cfg,
            VarBuilder::from_varmap(&tf_vars, DType::F32, &dev),
        )?;
        crate::train::init_vars(&tf_vars, seed, crate::transformer::model::init_value)?;
        let captions: Vec<String> = ["a red circle", "two blue squares above a green star"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let tokenizer = work.join("tokenizer.json");
        crate::text::save(
            &crate::text::train(&captions, cfg.geometry.text_vocab, 1)?,
            &tokenizer,
        )?;
        let input = ExportInput {
            preset: cfg.preset.clone(),
            dvae_geometry: cfg.geometry,
            transformer_geometry: cfg.geometry,
            codec: dalle_export::ImageCodec::Dvae(dvae_spec(&cfg)),
            encoder: to_weights(&encoder)?,
            encoder_source: format!("random {preset} dVAE encoder"),
            decoder: to_weights(&decoder)?,
            decoder_source: format!("random {preset} dVAE decoder"),
            transformer: transformer_spec(&cfg),
            transformer_weights: to_weights(&tensors(&tf_vars))?,
            transformer_source: format!("random {preset} transformer"),
            tokenizer,
            sampling: Default::default(),
        };
        let opts = ExportOptions {
            dtype,
            ..ExportOptions::default()
        };
        dalle_export::export(&input, &model.dir, &opts, &mut |_| {})?;
        Ok(model)
    }
}

fn tensors(vm: &VarMap) -> HashMap<String, candle_core::Tensor> {
    crate::train::named_vars(vm)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect()
}
