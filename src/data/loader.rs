//! Deterministic training batches: the samples of update `step` depend only on `(seed, step)`,
//! so a resumed run sees exactly the batches an uninterrupted one would.

use super::{crop_square, decode_rgb, read_bytes, resize_short_side, Index};
use crate::rng::Rng;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The sample order of a training run: a fresh permutation of `0..len` per epoch, drawn from
/// `Rng::stream(seed, "epoch", epoch)`, the current one cached.
pub struct EpochOrder {
    len: usize,
    seed: u64,
    current: Mutex<Option<(u64, Arc<Vec<u32>>)>>,
}

impl EpochOrder {
    pub fn new(len: usize, seed: u64) -> Self {
        EpochOrder {
            len,
            seed,
            current: Mutex::new(None),
        }
    }

    /// The permutation of `epoch`.
    pub fn permutation(&self, epoch: u64) -> Arc<Vec<u32>> {
        let mut slot = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, p)) = slot.as_ref() {
            if *e == epoch {
                return p.clone();
            }
        }
        let mut perm: Vec<u32> = (0..self.len as u32).collect();
        Rng::stream(self.seed, "epoch", epoch).shuffle(&mut perm);
        let perm = Arc::new(perm);
        *slot = Some((epoch, perm.clone()));
        perm
    }

    /// The sample at overall position `pos` (update × batch + slot); `len` must be positive.
    pub fn at(&self, pos: u64) -> usize {
        let n = self.len as u64;
        self.permutation(pos / n)[(pos % n) as usize] as usize
    }
}

/// Decoded images kept in memory, up to this many bytes.
const CACHE_BUDGET: usize = 1 << 30;

pub struct Loader {
    index: Index,
    size: u32,
    max_pixels: u64,
    seed: u64,
    cache: Mutex<(HashMap<usize, Arc<RgbImage>>, usize)>,
    order: EpochOrder,
    failed: Mutex<Vec<bool>>,
}

/// An error that says why, when `index` has no sample to train on (check it before writing
/// anything of a run).
pub fn require_usable(index: &Index) -> Result<()> {
    if index.samples.is_empty() {
        return Err(Error::Dataset {
            path: index.root.clone(),
            message: if index.seen == 0 {
                "has no samples (its metadata.jsonl or .tar shards list none): add \
                 {\"file_name\", \"text\"} lines or KEY.jpg + KEY.txt pairs \
                 (`dalle data shapes --out DIR` writes a set)"
                    .to_string()
            } else {
                format!(
                    "has no usable samples ({} seen, {} skipped: {}); run `dalle data stats` \
                     for details",
                    index.seen,
                    index.skipped(),
                    index
                        .skips
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
        });
    }
    Ok(())
}

impl Loader {
    pub fn new(index: Index, size: u32, max_pixels: u64, seed: u64) -> Result<Self> {
        require_usable(&index)?;
        let n = index.samples.len();
        Ok(Loader {
            index,
            size,
            max_pixels,
            seed,
            cache: Mutex::new((HashMap::new(), 0)),
            order: EpochOrder::new(n, seed),
            failed: Mutex::new(vec![false; n]),
        })
    }

    pub fn len(&self) -> usize {
        self.index.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.samples.is_empty()
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The image of sample `i`, shorter side resized to the model size; `None` if it cannot be
    /// decoded (counted once, with a warning).
    pub fn image(&self, i: usize) -> Option<Arc<RgbImage>> {
        if let Some(img) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(&i)
        {
            return Some(img.clone());
        }
        let sample = &self.index.samples[i];
        let decoded = read_bytes(&sample.source)
            .map_err(|_| "unreadable")
            .and_then(|b| decode_rgb(&b, self.max_pixels));
        match decoded {
            Ok(img) => {
                let img = Arc::new(resize_short_side(&img, self.size));
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                let bytes = img.as_raw().len();
                if cache.1 + bytes <= CACHE_BUDGET {
                    cache.1 += bytes;
                    cache.0.insert(i, img.clone());
                }
                Some(img)
            }
            Err(why) => {
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                if !failed[i] {
                    failed[i] = true;
                    eprintln!("warning: skipping sample {:?}: {why}", sample.source);
                }
                None
            }
        }
    }

    /// Sample indices and images of update `step`, `batch` of them, randomly cropped.
    pub fn batch(&self, step: usize, batch: usize) -> Result<(Vec<usize>, Vec<RgbImage>)> {
        let n = self.len() as u64;
        let mut ids = Vec::with_capacity(batch);
        let mut images = Vec::with_capacity(batch);
        for b in 0..batch as u64 {
            let pos = step as u64 * batch as u64 + b;
            let perm = self.order.permutation(pos / n);
            let mut crop = Rng::stream(self.seed, "crop", pos);
            // A sample that fails to decode is replaced by the next one in the permutation.
            let found = (0..n).find_map(|k| {
                let i = perm[((pos % n + k) % n) as usize] as usize;
                self.image(i).map(|img| (i, img))
            });
            let Some((i, img)) = found else {
                return Err(Error::Dataset {
                    path: self.index.root.clone(),
                    message: "no sample could be decoded".into(),
                });
            };
            ids.push(i);
            images.push(crop_square(&img, self.size, crop.uniform()));
        }
        Ok((ids, images))
    }

    /// The first `count` decodable samples, centre-cropped: a fixed set for sample grids and eval.
    pub fn fixed(&self, count: usize) -> Vec<(usize, RgbImage)> {
        (0..self.len())
            .filter_map(|i| {
                self.image(i)
                    .map(|img| (i, crop_square(&img, self.size, 0.5)))
            })
            .take(count)
            .collect()
    }

    /// Images of `step` as a (batch, 3, H, W) tensor.
    pub fn batch_tensor(&self, step: usize, batch: usize, device: &Device) -> Result<Tensor> {
        let (_, images) = self.batch(step, batch)?;
        super::images_to_tensor(&images, device)
    }
}
