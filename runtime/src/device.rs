//! Devices named by the user: `cpu`, `cuda` (GPU 0) or `cuda:N`.
//!
//! Parsing ([`parse`], a pure function of the text) is kept apart from opening
//! ([`DeviceSpec::open`]): a command line can be checked for typos without touching a GPU, and a
//! well-formed request that this machine cannot serve is reported as such, with the reason.
//!
//! The same code serves both builds. A binary built without the `cuda` feature refuses CUDA with a
//! message saying how to get one that has it; a CUDA binary on a machine without a driver, a GPU
//! or the CUDA libraries says which of them is missing. Neither panics: with the CUDA libraries
//! opened at run time (scripts/build-cuda.sh), a missing library surfaces as a panic inside
//! cudarc, which [`DeviceSpec::open`] catches and turns into an error.
//!
//! ```
//! use cartridge_runtime::device::{self, DeviceSpec};
//! assert_eq!(device::parse("cuda:1").unwrap(), DeviceSpec::Cuda(1));
//! let cpu = device::parse("cpu").unwrap().open().unwrap();
//! assert!(cpu.is_cpu());
//! ```

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// Where to compute, as the user named it (not yet opened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (f32).
    #[default]
    Cpu,
    /// The CUDA GPU with this index (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The text names no device.
    #[error("unknown device {0:?}: expected cpu, cuda or cuda:N (N the GPU's index)")]
    Invalid(String),
    /// CUDA was asked for in a binary built without it.
    #[error("{requested}: this binary was built without CUDA support; rebuild with scripts/build-cuda.sh")]
    NotCompiled {
        /// The device asked for.
        requested: DeviceSpec,
    },
    /// The binary has CUDA but this machine cannot provide the device.
    #[error("{requested} is not available: {reason}")]
    Unavailable {
        /// The device asked for.
        requested: DeviceSpec,
        /// What is missing (driver, GPU, library), in one line.
        reason: String,
    },
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        parse(s)
    }
}

/// Parse `cpu`, `cuda` or `cuda:N` (case-insensitive, surrounding spaces ignored).
pub fn parse(text: &str) -> Result<DeviceSpec, DeviceError> {
    let s = text.trim().to_ascii_lowercase();
    let invalid = || DeviceError::Invalid(text.to_string());
    match s.as_str() {
        "cpu" => Ok(DeviceSpec::Cpu),
        "cuda" => Ok(DeviceSpec::Cuda(0)),
        _ => {
            let n = s.strip_prefix("cuda:").ok_or_else(invalid)?;
            // Digits only: no sign, no spaces, no empty index.
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            n.parse().map(DeviceSpec::Cuda).map_err(|_| invalid())
        }
    }
}

/// Whether this build can compute on CUDA at all (candle's `cuda` feature).
pub fn cuda_compiled() -> bool {
    candle_core::utils::cuda_is_available()
}

impl DeviceSpec {
    /// Open the device. CUDA: the driver, the GPU and candle's CUDA libraries (cuBLAS, cuRAND)
    /// are loaded here, once, so that a missing piece is reported before any work starts.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(ordinal) => {
                if !cuda_compiled() {
                    return Err(DeviceError::NotCompiled { requested: self });
                }
                let unavailable = |reason: String| DeviceError::Unavailable {
                    requested: self,
                    reason,
                };
                match catch_quietly(|| Device::new_cuda(ordinal)) {
                    Ok(Ok(device)) => Ok(device),
                    Ok(Err(e)) => Err(unavailable(one_line(&e.to_string()))),
                    Err(panic) => Err(unavailable(library_reason(&panic))),
                }
            }
        }
    }

    /// Whether this is the CPU.
    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }
}

/// Run `f`, turning a panic into `Err(its message)` without printing it (the default hook would
/// print a backtrace hint for what is an ordinary "library not found" here).
fn catch_quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the CUDA backend panicked".to_string())
    })
}

/// The reason in a panic of cudarc's run-time loader, shortened to one line: which library could
/// not be opened, and what to do about it.
fn library_reason(panic: &str) -> String {
    // cudarc: `Unable to dynamically load the "cublas" shared library - searched for library
    // names: [...]. Ensure that `LD_LIBRARY_PATH` has the correct path ...`
    let lib = panic
        .split_once("load the \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(name, _)| name);
    match lib {
        Some("cuda") => "no NVIDIA driver found (libcuda.so.1 could not be loaded)".to_string(),
        Some(name) => format!(
            "the CUDA library lib{name} could not be loaded; install it (e.g. \
             scripts/install-cuda.sh --runtime-libs) and add its folder to LD_LIBRARY_PATH"
        ),
        None => one_line(panic),
    }
}

/// The first line of `s`, trimmed.
fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_names() {
        assert_eq!(parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse(" CPU ").unwrap(), DeviceSpec::Cpu);
        assert_eq!(parse("cuda").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse("cuda:0").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(parse("cuda:7").unwrap(), DeviceSpec::Cuda(7));
        for bad in [
            "", "bogus", "cuda:", "cuda:-1", "cuda:+1", "cuda: 1", "cuda:x", "cuda0", "gpu",
            "metal",
        ] {
            assert!(
                matches!(parse(bad), Err(DeviceError::Invalid(_))),
                "{bad:?} parsed"
            );
        }
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert_eq!(
            parse(&DeviceSpec::Cuda(3).to_string()).unwrap(),
            DeviceSpec::Cuda(3)
        );
    }

    #[test]
    fn cpu_opens_and_cuda_is_refused_clearly_without_it() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        match DeviceSpec::Cuda(0).open() {
            Ok(d) => assert!(d.is_cuda()),
            Err(DeviceError::NotCompiled { .. }) => assert!(!cuda_compiled()),
            Err(DeviceError::Unavailable { reason, .. }) => {
                assert!(cuda_compiled());
                assert!(!reason.is_empty() && !reason.contains('\n'), "{reason}");
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn loader_panics_become_short_reasons() {
        let p = "Unable to dynamically load the \"cuda\" shared library - searched for library \
                 names: [\"libcuda.so\"]. Ensure that `LD_LIBRARY_PATH` has the correct path";
        assert!(library_reason(p).contains("no NVIDIA driver"));
        let p = p.replace("\"cuda\"", "\"cublas\"");
        assert!(library_reason(&p).contains("libcublas"));
        assert_eq!(library_reason("boom\nmore"), "boom");
        assert_eq!(catch_quietly(|| 1).unwrap(), 1);
        let e = catch_quietly(|| -> u32 { panic!("quiet {}", 1) }).unwrap_err();
        assert_eq!(e, "quiet 1");
    }
}
