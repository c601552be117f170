//! What the kernels' tests share: each fused op against its tensor-op version, values and
//! gradients.

use candle_core::{Device, Result, Tensor, Var, D};

pub(crate) fn close(a: &Tensor, b: &Tensor, tol: f32) {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d <= tol, "max |Δ| {d} > {tol}");
}

pub(crate) fn var(shape: &[usize], std: f32) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap()).unwrap()
}

/// `ours` and `theirs` (the same function of `vars`) agree within `fwd`, and the gradients of
/// Σ output ⊙ probe with respect to every var within `bwd`.
pub(crate) fn agree(vars: &[&Var], ours: Tensor, theirs: Tensor, fwd: f32, bwd: f32) {
    close(&ours, &theirs, fwd);
    let probe = Tensor::randn(0f32, 1.0, ours.dims(), ours.device()).unwrap();
    let grads = |y: Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let (g1, g2) = (grads(ours), grads(theirs));
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let d = d.to_scalar::<f32>().unwrap();
        assert!(d <= bwd, "gradient of var {i}: max |Δ| {d} > {bwd}");
    }
}

/// softmax from tensor ops, the reference for the fused ones.
pub(crate) fn softmax_ops(x: &Tensor) -> Tensor {
    let max = x.max_keepdim(D::Minus1).unwrap().detach();
    let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
    e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
}

/// Forward and input gradients of `ours` and `reference` agree on random inputs, within
/// `tol` (f32 sums in another order).
pub(crate) fn agree_on(
    inputs: &[Tensor],
    tol: f32,
    ours: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    let vars: Vec<Var> = inputs.iter().map(Var::from_tensor).collect::<Result<_>>()?;
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (ours(&xs)?, reference(&xs)?);
    assert_eq!(a.dims(), b.dims());
    let fwd = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(fwd <= tol, "forward differs by {fwd}");
    let g = Tensor::randn(0f32, 1., a.dims(), a.device())?;
    let (ga, gb) = (
        (a * &g)?.sum_all()?.backward()?,
        (b * &g)?.sum_all()?.backward()?,
    );
    for (i, v) in vars.iter().enumerate() {
        let d = (ga.get(v).unwrap() - gb.get(v).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d <= tol, "gradient of input {i} differs by {d}");
    }
    Ok(())
}
