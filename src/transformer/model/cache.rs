//! The key/value cache of decoding: buffers of the whole sequence's capacity that each step
//! writes its keys and values into.

use candle_core::{Result, Tensor};

/// Keys and values of every layer for the positions seen so far, in buffers of the whole
/// sequence's capacity, (b, heads, seq_len, head_dim), of which the first `past_len` positions
/// are filled: a step writes its keys in place instead of concatenating (and so copying) the
/// whole cache. Not `Clone`: clones would share (and overwrite) the buffers.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// A cache of `len` positions held in `layers` (keys, values) per layer, each
    /// (b, heads, ≥ len, head_dim) — capacity buffers from [`KvCache::into_layers`] or tensors
    /// of exactly `len` positions (moved into buffers at the next step). The tensors must not
    /// be shared with another cache.
    pub fn from_layers(layers: Vec<Option<(Tensor, Tensor)>>, len: usize) -> Self {
        KvCache { layers, len }
    }

    /// The (keys, values) buffers of every layer.
    pub fn into_layers(self) -> Vec<Option<(Tensor, Tensor)>> {
        self.layers
    }

    /// Number of positions already in the cache.
    pub fn past_len(&self) -> usize {
        self.len
    }
}

/// One layer's slot of a [`KvCache`] with the positions already filled and the capacity.
pub(super) type LayerCache<'a> = (&'a mut Option<(Tensor, Tensor)>, usize, usize);

/// Write this call's keys and values `(k, v)` (b, h, t, hd) into `slot`'s buffers at positions
/// `past ..`, allocating buffers of `capacity` positions (and moving an exact-length cache into
/// them) first if needed. Returns the buffers.
pub(super) fn store(
    slot: &mut Option<(Tensor, Tensor)>,
    k: &Tensor,
    v: &Tensor,
    past: usize,
    capacity: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, _, hd) = k.dims4()?;
    let fits = matches!(slot, Some((bk, _)) if bk.dim(2)? == capacity);
    if !fits {
        let fresh = || crate::kernels::pages::zeroed_like((b, h, capacity, hd), k);
        let (bk, bv) = (fresh()?, fresh()?);
        if let Some((ok, ov)) = slot.take() {
            bk.slice_set(&ok.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
            bv.slice_set(&ov.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
        }
        *slot = Some((bk, bv));
    }
    let (bk, bv) = slot.as_ref().expect("allocated above");
    bk.slice_set(k, 2, past)?;
    bv.slice_set(v, 2, past)?;
    Ok((bk.clone(), bv.clone()))
}
