//! The original's three ways of choosing a batch's adapters, and the series a report holds
//! (no-LoRA plus one per workload).
//!
//! `uniform` draws from our own seeded RNG (rand's `StdRng`), not Python's: the distribution is
//! the original's, the exact draws are ours, and they depend only on the seed and the batch
//! size, so a batch is the same whatever other batch sizes or workloads run beside it.

use anyhow::bail;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Adapters 0, 1, ..., B-1.
    Distinct,
    /// B uniform draws from adapters 0 .. ceil(sqrt(B)) - 1.
    Uniform,
    /// `identical_lora_id`, B times.
    Identical,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::Distinct, Workload::Uniform, Workload::Identical];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Distinct => "distinct",
            Workload::Uniform => "uniform",
            Workload::Identical => "identical",
        }
    }

    /// `distinct`, `uniform`, `identical`, `all`, or a comma-separated list of them.
    pub fn parse_list(s: &str) -> anyhow::Result<Vec<Workload>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim) {
            let add: &[Workload] = match part {
                "all" => &Workload::ALL,
                "distinct" => &[Workload::Distinct],
                "uniform" => &[Workload::Uniform],
                "identical" => &[Workload::Identical],
                other => bail!("unknown workload {other:?}; expected distinct, uniform, identical or all"),
            };
            for &w in add {
                if !out.contains(&w) {
                    out.push(w);
                }
            }
        }
        Ok(out)
    }

    /// Indices into the adapter group for a batch of `batch_size` requests.
    pub fn adapter_indices(self, batch_size: usize, seed: u64, identical_lora_id: usize) -> Vec<usize> {
        match self {
            Workload::Distinct => (0..batch_size).collect(),
            Workload::Uniform => {
                let pool = ceil_sqrt(batch_size);
                let mut rng = StdRng::seed_from_u64(batch_seed(seed, batch_size));
                (0..batch_size).map(|_| rng.random_range(0..pool)).collect()
            }
            Workload::Identical => vec![identical_lora_id; batch_size],
        }
    }

    /// How many adapters the group must hold for this batch size.
    pub fn num_adapters_needed(self, batch_size: usize, identical_lora_id: usize) -> usize {
        match self {
            Workload::Distinct => batch_size,
            Workload::Uniform => ceil_sqrt(batch_size),
            Workload::Identical => identical_lora_id + 1,
        }
    }
}

/// One line of a report: the base model alone, or one LoRA workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Series {
    NoLora,
    Lora(Workload),
}

impl Series {
    /// `no-lora`, or the workload's name; also the series' folder in the report.
    pub fn name(self) -> &'static str {
        match self {
            Series::NoLora => "no-lora",
            Series::Lora(w) => w.name(),
        }
    }

    /// The series named `name` (as [`Series::name`] writes it).
    pub fn from_name(name: &str) -> Option<Series> {
        match name {
            "no-lora" => Some(Series::NoLora),
            _ => Workload::ALL
                .into_iter()
                .find(|w| w.name() == name)
                .map(Series::Lora),
        }
    }

    /// The workload's name, `none` for no-LoRA (the `workload` column of the reports).
    pub fn workload_name(self) -> &'static str {
        match self {
            Series::NoLora => "none",
            Series::Lora(w) => w.name(),
        }
    }

    /// The original script that measures this series.
    pub fn mode(self) -> &'static str {
        match self {
            Series::NoLora => "no-lora",
            Series::Lora(_) => "multi-lora",
        }
    }
}

// By name in the report's points.jsonl, which `--resume` reads back.
impl Serialize for Series {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Series {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Series::from_name(&name).ok_or_else(|| serde::de::Error::custom(format!("unknown series {name:?}")))
    }
}

/// Smallest k with k * k >= n (the original's `ceil(sqrt(n))`, without floating point).
pub fn ceil_sqrt(n: usize) -> usize {
    let mut k = (n as f64).sqrt() as usize;
    while k * k < n {
        k += 1;
    }
    while k > 0 && (k - 1) * (k - 1) >= n {
        k -= 1;
    }
    k
}

fn batch_seed(seed: u64, batch_size: usize) -> u64 {
    seed ^ (batch_size as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_sqrt_matches_the_definition() {
        let got: Vec<usize> = [1, 2, 4, 5, 8, 9, 10, 16, 17, 32, 1000].map(ceil_sqrt).to_vec();
        assert_eq!(got, vec![1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 32]);
        assert_eq!(ceil_sqrt(0), 0);
    }

    #[test]
    fn distinct_and_identical() {
        assert_eq!(Workload::Distinct.adapter_indices(4, 9, 0), vec![0, 1, 2, 3]);
        assert_eq!(Workload::Identical.adapter_indices(3, 9, 5), vec![5, 5, 5]);
        assert_eq!(Workload::Distinct.num_adapters_needed(32, 0), 32);
        assert_eq!(Workload::Identical.num_adapters_needed(32, 5), 6);
        assert_eq!(Workload::Uniform.num_adapters_needed(32, 0), 6);
    }

    #[test]
    fn uniform_is_seeded_and_exact() {
        // Pinned: a change here changes every published uniform result.
        assert_eq!(Workload::Uniform.adapter_indices(1, 0, 0), vec![0]);
        assert_eq!(Workload::Uniform.adapter_indices(4, 0, 0), vec![1, 1, 0, 0]);
        assert_eq!(
            Workload::Uniform.adapter_indices(8, 42, 0),
            vec![1, 1, 1, 0, 0, 1, 1, 1]
        );
        let a = Workload::Uniform.adapter_indices(32, 7, 0);
        assert_eq!(a, Workload::Uniform.adapter_indices(32, 7, 0));
        assert_ne!(a, Workload::Uniform.adapter_indices(32, 8, 0));
        assert!(a.iter().all(|&i| i < 6));
    }

    #[test]
    fn parses_lists() -> anyhow::Result<()> {
        assert_eq!(Workload::parse_list("all")?, Workload::ALL.to_vec());
        assert_eq!(
            Workload::parse_list("identical, distinct,identical")?,
            vec![Workload::Identical, Workload::Distinct]
        );
        assert!(Workload::parse_list("random").is_err());
        Ok(())
    }
}
