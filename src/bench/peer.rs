//! The PyTorch peer: `bench/pytorch_peer.py` (lucidrains' dalle-pytorch 1.6.6) run as a child
//! process in the same geometry and thread count, its JSON read back.

use crate::config::Config;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerGenerate {
    pub batch: usize,
    pub prefill_s: f64,
    pub first_step_s: f64,
    pub last_step_s: f64,
    pub transformer_s: f64,
    pub dvae_decode_s: f64,
    pub image_tokens_per_s: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerTrain {
    pub batch: usize,
    pub transformer_step_s: f64,
    /// dalle-pytorch's own `DiscreteVAE`: a different, much smaller network than ours.
    pub dvae_step_s: f64,
    /// OpenAI's `dall_e` 0.1 dVAE (the network ours mirrors) in our geometry, on our loss.
    #[serde(default)]
    pub openai_dvae_step_s: Option<f64>,
    #[serde(default)]
    pub openai_dvae_params: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerReport {
    pub peer: String,
    pub version: String,
    pub torch: String,
    pub threads: usize,
    pub transformer_params: usize,
    pub dvae_params: usize,
    pub generate: Vec<PeerGenerate>,
    pub train: Option<PeerTrain>,
    /// torch's 2048³ product, GFLOP/s, by dtype (`f32`, `bf16`), measured in the same run.
    #[serde(default)]
    pub matmul_gflop_per_s: std::collections::BTreeMap<String, f64>,
}

/// The script beside the sources of this build.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/pytorch_peer.py")
}

/// `python`, else `$DALLE_PEER_PYTHON`, else the venv `bench/install-peer.sh` makes.
pub fn python(python: Option<&Path>) -> PathBuf {
    python
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("DALLE_PEER_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peer/bin/python"))
}

const INSTALL: &str = "install it with `bash bench/install-peer.sh` (or point --peer-python / DALLE_PEER_PYTHON at a Python with torch and dalle-pytorch 1.6.6)";

/// Fail before any measurement when the peer cannot run.
pub fn check(python: &Path) -> Result<()> {
    if !python.exists() {
        return Err(Error::Usage(format!(
            "the PyTorch peer's Python {} does not exist: {INSTALL}",
            python.display()
        )));
    }
    if !script().is_file() {
        return Err(Error::Usage(format!(
            "the PyTorch peer's script {} is missing: run dalle from its source tree",
            script().display()
        )));
    }
    Ok(())
}

/// The peer's command line for `cfg`'s geometry: generation at `batches`, training steps at
/// `train_batch` (0: none), with `threads` threads.
fn command(
    python: &Path,
    cfg: &Config,
    batches: &[usize],
    (train_batch, train_reps): (usize, usize),
    (passes, threads): (usize, usize),
) -> std::process::Command {
    let g = &cfg.geometry;
    let t = &cfg.transformer;
    let batch = batches
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let args: Vec<(&str, String)> = vec![
        ("--dim", t.d_model.to_string()),
        ("--depth", t.n_layers.to_string()),
        ("--heads", t.n_heads.to_string()),
        ("--text-len", g.text_len.to_string()),
        ("--text-vocab", g.text_vocab.to_string()),
        ("--image-size", g.image_size.to_string()),
        ("--grid", g.grid.to_string()),
        ("--codebook", g.codebook.to_string()),
        ("--vae-dim", cfg.vae.n_hid.to_string()),
        ("--vae-groups", cfg.vae.group_count.to_string()),
        ("--vae-hid", cfg.vae.n_hid.to_string()),
        ("--vae-blocks", cfg.vae.n_blk_per_group.to_string()),
        ("--vae-init", cfg.vae.n_init.to_string()),
        ("--train-batch", train_batch.to_string()),
        ("--train-reps", train_reps.max(1).to_string()),
        ("--threads", threads.to_string()),
        ("--passes", passes.max(1).to_string()),
        ("--batch", batch),
    ];
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script());
    for (k, v) in &args {
        cmd.arg(k).arg(v);
    }
    cmd
}

/// Run the peer on `cfg`'s geometry: generation at `batches`, training steps at `train_batch`
/// (0: none), with `threads` threads.
pub fn run(
    python: &Path,
    cfg: &Config,
    batches: &[usize],
    train: (usize, usize),
    (passes, threads): (usize, usize),
) -> Result<PeerReport> {
    check(python)?;
    let mut cmd = command(python, cfg, batches, train, (passes, threads));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Usage(format!("cannot run {}: {e}; {INSTALL}", python.display())))?;
    if !out.status.success() {
        return Err(Error::Usage(format!(
            "the PyTorch peer failed ({}; its error is above); {INSTALL}",
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(line).map_err(|e| {
        Error::Usage(format!(
            "the PyTorch peer printed no report ({e}); its output was: {}",
            text.trim()
        ))
    })
}

/// The peer's training steps on request (`pytorch_peer.py --serve-train`): a child process that
/// keeps its models and optimisers between steps, so that `dalle bench` can alternate its own
/// steps with the peer's and both see the machine in the same state (this machine's speed
/// drifts 20–30% over minutes).
pub struct PeerTrainer {
    child: std::process::Child,
    /// Closed (dropped) to stop the peer: its loop ends at the end of its input.
    input: Option<std::process::ChildStdin>,
    output: std::io::BufReader<std::process::ChildStdout>,
    /// Parameters of OpenAI's dVAE in this geometry, as the peer counted them.
    pub openai_dvae_params: Option<usize>,
}

/// The error for a peer that exited with `status` while steps were still wanted.
fn stopped(status: &str) -> Error {
    Error::Usage(format!(
        "the PyTorch peer stopped ({status}; its error is above); {INSTALL}"
    ))
}

#[derive(Deserialize)]
struct Ready {
    openai_dvae_params: Option<usize>,
}

#[derive(Deserialize)]
struct Answer {
    s: Option<f64>,
    error: Option<String>,
}

impl PeerTrainer {
    /// Start the peer and wait until its models are built.
    pub fn start(python: &Path, cfg: &Config, batch: usize, threads: usize) -> Result<Self> {
        use std::process::Stdio;
        check(python)?;
        let mut child = command(python, cfg, &[], (batch, 1), (1, threads))
            .arg("--serve-train")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                Error::Usage(format!("cannot run {}: {e}; {INSTALL}", python.display()))
            })?;
        let (Some(input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(Error::Usage("the PyTorch peer's pipes did not open".into()));
        };
        let mut peer = PeerTrainer {
            child,
            input: Some(input),
            output: std::io::BufReader::new(output),
            openai_dvae_params: None,
        };
        let ready: Ready = peer.read()?;
        peer.openai_dvae_params = ready.openai_dvae_params;
        Ok(peer)
    }

    fn read<T: serde::de::DeserializeOwned>(&mut self) -> Result<T> {
        use std::io::BufRead;
        let mut line = String::new();
        let n = self
            .output
            .read_line(&mut line)
            .map_err(|e| Error::Usage(format!("reading from the PyTorch peer: {e}")))?;
        if n == 0 {
            let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(stopped(&status));
        }
        serde_json::from_str(&line)
            .map_err(|e| Error::Usage(format!("the PyTorch peer answered `{}` ({e})", line.trim())))
    }

    /// Seconds of one peer step: `transformer`, `dvae` (dalle-pytorch's own) or `openai_dvae`.
    pub fn step(&mut self, name: &str) -> Result<f64> {
        use std::io::Write;
        // Writing into the pipe of a peer that has exited would end this process (SIGPIPE).
        if let Ok(Some(status)) = self.child.try_wait() {
            return Err(stopped(&status.to_string()));
        }
        let Some(input) = self.input.as_mut() else {
            return Err(Error::Usage("the PyTorch peer's input is closed".into()));
        };
        writeln!(input, "{name}")
            .and_then(|_| input.flush())
            .map_err(|e| Error::Usage(format!("writing to the PyTorch peer: {e}")))?;
        let a: Answer = self.read()?;
        match (a.s, a.error) {
            (Some(s), _) => Ok(s),
            (None, e) => Err(Error::Usage(format!(
                "the PyTorch peer could not run step `{name}`: {}",
                e.unwrap_or_default()
            ))),
        }
    }
}

impl Drop for PeerTrainer {
    fn drop(&mut self) {
        // End of input stops the peer between steps; one in the middle of a step is not waited
        // for.
        self.input = None;
        for _ in 0..20 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
