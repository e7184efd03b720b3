//! Where a run computes and in which floating-point type: `cpu`, `cuda` or `cuda:N` in, a
//! [`DeviceSpec`] out; `f32`, `bf16`, `f16` or `f64` in, a [`Precision`] out. Both are parsed
//! once, when a configuration is resolved; serialised they are the same strings, so manifests
//! and configuration files read as before. Opening the device (which needs a CUDA build for
//! `cuda`) happens when the work starts, in [`DeviceSpec::open`].

use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// A compute device as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device; `None` is written `cuda` (device 0), `Some(n)` is `cuda:n`.
    Cuda(Option<usize>),
}

impl DeviceSpec {
    /// Parses `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> Result<DeviceSpec> {
        let bad = || Error::Invalid(format!("unknown device `{s}` (use cpu, cuda or cuda:N)"));
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| DeviceSpec::Cuda(Some(n)))
                .ok_or_else(bad),
        }
    }

    /// Opens the device (a CUDA device needs a build with `--features cuda`).
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Invalid(format!(
                        "device `{self}`: this mlbench was built without CUDA; rebuild with `cargo build --release --features cuda`"
                    )));
                }
                Ok(Device::new_cuda(n.unwrap_or(0))?)
            }
        }
    }

    pub fn is_cpu(self) -> bool {
        self == DeviceSpec::Cpu
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

/// The floating-point type a model's weights and activations are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
    F64,
}

const PRECISIONS: [(&str, Precision, DType); 4] = [
    ("f32", Precision::F32, DType::F32),
    ("bf16", Precision::Bf16, DType::BF16),
    ("f16", Precision::F16, DType::F16),
    ("f64", Precision::F64, DType::F64),
];

impl Precision {
    /// Parses `f32`, `bf16`, `f16` or `f64`.
    pub fn parse(s: &str) -> Result<Precision> {
        PRECISIONS
            .iter()
            .find(|(n, _, _)| *n == s)
            .map(|(_, p, _)| *p)
            .ok_or_else(|| {
                Error::Invalid(format!("unknown dtype `{s}` (use f32, bf16, f16 or f64)"))
            })
    }

    fn entry(self) -> &'static (&'static str, Precision, DType) {
        PRECISIONS
            .iter()
            .find(|(_, p, _)| *p == self)
            .expect("every precision is listed")
    }

    pub fn name(self) -> &'static str {
        self.entry().0
    }

    /// The candle type.
    pub fn dtype(self) -> DType {
        self.entry().2
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Serialises a value as its `Display` string and reads it back through `parse`.
macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<$t, D::Error> {
                let s = String::deserialize(d)?;
                <$t>::parse(&s).map_err(serde::de::Error::custom)
            }
        }
        impl std::str::FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<$t> {
                <$t>::parse(s)
            }
        }
    };
}
string_serde!(DeviceSpec);
string_serde!(Precision);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_precisions_round_trip_as_their_strings() {
        for s in ["cpu", "cuda", "cuda:1"] {
            let d = DeviceSpec::parse(s).unwrap();
            assert_eq!(d.to_string(), s);
            assert_eq!(serde_json::to_value(d).unwrap(), s);
        }
        for s in ["f32", "bf16", "f16", "f64"] {
            assert_eq!(Precision::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Precision::Bf16.dtype(), DType::BF16);
    }

    #[test]
    fn unknown_devices_and_precisions_are_refused() {
        for s in ["gpu", "cuda:", "cuda:x", "CPU"] {
            let e = DeviceSpec::parse(s).unwrap_err().to_string();
            assert!(e.contains("unknown device"), "{s}: {e}");
        }
        let e = serde_json::from_str::<Precision>("\"fp32\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown dtype `fp32`"), "{e}");
        assert!(DeviceSpec::Cpu.open().is_ok());
    }
}
