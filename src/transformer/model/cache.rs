//! The key/value cache of decoding: buffers of the whole sequence's capacity that each step
//! writes its keys and values into.

use candle_core::{Result, Tensor};

/// Keys and values of every layer for the positions seen so far, in buffers of the whole
/// sequence's capacity, (b, heads, seq_len, head_dim), of which each row's first `pasts[row]`
/// positions are filled: a step writes its keys in place instead of concatenating (and so
/// copying) the whole cache. Rows may hold different numbers of positions (a server's requests
/// join the batch at any step); then only single-token steps on the CPU take them. Not `Clone`:
/// clones would share (and overwrite) the buffers.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<(Tensor, Tensor)>>,
    /// Positions held by each row; empty before the first call (every row at 0).
    pub(super) pasts: Vec<usize>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache {
            layers: vec![None; n_layers],
            pasts: vec![],
        }
    }

    /// A cache holding `pasts[row]` positions of each row in `layers` (keys, values) per layer,
    /// each (b, heads, ≥ max(pasts), head_dim) — capacity buffers from [`KvCache::into_layers`]
    /// or tensors of exactly the rows' common length (moved into buffers at the next step).
    /// The tensors must not be shared with another cache.
    pub fn from_layers(layers: Vec<Option<(Tensor, Tensor)>>, pasts: Vec<usize>) -> Self {
        KvCache { layers, pasts }
    }

    /// The (keys, values) buffers of every layer.
    pub fn into_layers(self) -> Vec<Option<(Tensor, Tensor)>> {
        self.layers
    }

    /// Number of positions every row holds (`None`: rows hold different numbers).
    pub fn past_len(&self) -> Option<usize> {
        match self.pasts.split_first() {
            None => Some(0),
            Some((&first, rest)) => rest.iter().all(|&p| p == first).then_some(first),
        }
    }

    /// Positions held by each of `rows` rows.
    pub(super) fn row_pasts(&self, rows: usize) -> Result<Vec<usize>> {
        match self.pasts.len() {
            0 => Ok(vec![0; rows]),
            n if n == rows => Ok(self.pasts.clone()),
            n => candle_core::bail!("KV cache holds {n} rows, the call has {rows}"),
        }
    }
}

/// One layer's slot of a [`KvCache`] with each row's filled positions and the capacity.
pub(super) type LayerCache<'a> = (&'a mut Option<(Tensor, Tensor)>, &'a [usize], usize);

/// Write this call's keys and values `(k, v)` (b, h, t, hd) into `slot`'s buffers, row `r` at
/// positions `pasts[r] ..` (one entry: every row there), allocating buffers of `capacity`
/// positions (and moving an exact-length cache into them) first if needed. Returns the buffers.
pub(super) fn store(
    slot: &mut Option<(Tensor, Tensor)>,
    k: &Tensor,
    v: &Tensor,
    pasts: &[usize],
    capacity: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, _, hd) = k.dims4()?;
    let fits = matches!(slot, Some((bk, _)) if bk.dim(2)? == capacity);
    if !fits {
        let fresh = || crate::kernels::pages::zeroed_like((b, h, capacity, hd), k);
        let (bk, bv) = (fresh()?, fresh()?);
        if let Some((ok, ov)) = slot.take() {
            bk.slice_set(&ok.contiguous()?, 2, 0)?;
            bv.slice_set(&ov.contiguous()?, 2, 0)?;
        }
        *slot = Some((bk, bv));
    }
    let (bk, bv) = slot.as_ref().expect("allocated above");
    match pasts {
        [past] => {
            bk.slice_set(k, 2, *past)?;
            bv.slice_set(v, 2, *past)?;
        }
        pasts => {
            for (r, &past) in pasts.iter().enumerate() {
                bk.narrow(0, r, 1)?
                    .slice_set(&k.narrow(0, r, 1)?, 2, past)?;
                bv.narrow(0, r, 1)?
                    .slice_set(&v.narrow(0, r, 1)?, 2, past)?;
            }
        }
    }
    Ok((bk.clone(), bv.clone()))
}
