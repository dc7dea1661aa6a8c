//! Compression of fetched blocks, and `auto`, which picks a codec from the
//! measured link rate and CPU cost.
//!
//! Why `auto`: the seed found that on a 100 Mbps LAN compression costs more
//! CPU time than it saves, while at 2 Mbps zlib wins. The right codec moves
//! with the link, so the sender measures both sides of the trade while it
//! works: how fast the link drains (bytes per second of time spent blocked
//! in writes) and, per candidate codec, compressed ratio and CPU seconds per
//! byte on recent data. Compression and sending overlap, so a codec's cost
//! per input byte is the larger of its CPU time and its output's link time.

use std::str::FromStr;
use std::time::Instant;

use thiserror::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Lz4,
    Zstd(i32),
    Zlib(u32),
}

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Auto,
    Fixed(Codec),
}

#[derive(Debug, Error)]
pub enum CodecError {
    #[error("unknown codec code {0} on the wire")]
    Unknown(u8),
    #[error("{codec} payload does not decompress: {detail}")]
    Corrupt { codec: &'static str, detail: String },
    #[error("{codec} payload decompressed to {got} bytes, expected {want}")]
    Length { codec: &'static str, got: usize, want: usize },
}

impl Codec {
    pub fn code(self) -> u8 {
        match self {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd(_) => 2,
            Codec::Zlib(_) => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd(_) => "zstd",
            Codec::Zlib(_) => "zlib",
        }
    }

    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Codec::None => data.to_vec(), // callers send raw data as is; see source::fetch
            Codec::Lz4 => lz4_flex::block::compress(data),
            Codec::Zstd(level) => zstd::bulk::compress(data, level).expect("zstd compression of an in-memory buffer"),
            Codec::Zlib(level) => {
                use std::io::Write;
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
                e.write_all(data).expect("in-memory write");
                e.finish().expect("in-memory write")
            }
        }
    }

    /// The name of a wire codec code (for reports).
    pub fn name_of(code: u8) -> &'static str {
        match code {
            0 => "none",
            1 => "lz4",
            2 => "zstd",
            3 => "zlib",
            super::stream::STREAM_CODE => "zstd-stream",
            _ => "unknown",
        }
    }

    /// Decompress a payload that must expand to exactly `raw_len` bytes.
    /// Takes the payload by value so that raw data is never copied.
    pub fn decompress(code: u8, payload: Vec<u8>, raw_len: usize) -> Result<Vec<u8>, CodecError> {
        let data = &payload[..];
        let (name, out) = match code {
            0 => ("none", Ok(payload)),
            1 => ("lz4", lz4_flex::block::decompress(data, raw_len).map_err(|e| e.to_string())),
            2 => ("zstd", zstd::bulk::decompress(data, raw_len).map_err(|e| e.to_string())),
            3 => {
                use std::io::Read;
                let mut out = Vec::with_capacity(raw_len);
                // Read one byte past raw_len so an over-long stream is caught.
                let r = flate2::read::ZlibDecoder::new(data)
                    .take(raw_len as u64 + 1)
                    .read_to_end(&mut out)
                    .map(|_| out)
                    .map_err(|e| e.to_string());
                ("zlib", r)
            }
            c => return Err(CodecError::Unknown(c)),
        };
        let out = out.map_err(|detail| CodecError::Corrupt { codec: name, detail })?;
        if out.len() != raw_len {
            return Err(CodecError::Length { codec: name, got: out.len(), want: raw_len });
        }
        Ok(out)
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Codec::Zstd(l) => write!(f, "zstd:{l}"),
            Codec::Zlib(l) => write!(f, "zlib:{l}"),
            c => f.write_str(c.name()),
        }
    }
}

/// What `--compress` calls it (read back by `FromStr`).
impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Auto => f.write_str("auto"),
            Choice::Fixed(c) => c.fmt(f),
        }
    }
}

impl FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, level) = match s.split_once(':') {
            Some((n, l)) => (n, Some(l.parse::<i32>().map_err(|_| format!("bad compression level '{l}'"))?)),
            None => (s, None),
        };
        let codec = match (name, level) {
            ("auto", None) => return Ok(Choice::Auto),
            ("none", None) => Codec::None,
            ("lz4", None) => Codec::Lz4,
            ("zstd", l) => {
                let l = l.unwrap_or(3);
                if !(1..=19).contains(&l) {
                    return Err(format!("zstd level {l} is outside 1..=19"));
                }
                Codec::Zstd(l)
            }
            ("zlib", l) => {
                let l = l.unwrap_or(6);
                if !(1..=9).contains(&l) {
                    return Err(format!("zlib level {l} is outside 1..=9"));
                }
                Codec::Zlib(l as u32)
            }
            _ => {
                return Err(format!(
                    "unknown compression '{s}' (expected auto, none, lz4, zstd[:LEVEL] or zlib[:LEVEL])"
                ))
            }
        };
        Ok(Choice::Fixed(codec))
    }
}

/// How one fetched run travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Compressed on its own (or raw), in any order.
    Run(Codec),
    /// As the next piece of the copy's zstd stream (`wire::stream`), at the
    /// stream's level.
    Stream,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Run(c) => c.fmt(f),
            Route::Stream => write!(f, "zstd-stream:{}", super::stream::AUTO_LEVEL),
        }
    }
}

/// Candidates `auto` chooses among, cheapest CPU first.
const CANDIDATES: [Route; 4] =
    [Route::Run(Codec::None), Route::Run(Codec::Lz4), Route::Run(Codec::Zstd(1)), Route::Run(Codec::Zstd(6))];
/// The candidates when the copy has a stream: it takes the place of the
/// slower per-run zstd (at level 3 with its history it sends fewer bytes
/// than zstd 6 run by run: docs/experiments.md), the fast one stays for
/// links where one thread's zstd would not keep up. The stream is listed
/// before it, so per-run zstd must save 5% to be chosen: the stream's
/// sample (one run on its own) does not count its history, which saved
/// 14-17% over per-run zstd at the same level on the experiments' images.
const STREAM_CANDIDATES: [Route; 4] =
    [Route::Run(Codec::None), Route::Run(Codec::Lz4), Route::Stream, Route::Run(Codec::Zstd(1))];
/// Re-measure the candidates after this many input bytes.
const RESAMPLE_BYTES: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    ratio: f64,
    cpu_per_byte: f64,
}

/// The `auto` policy's state, fed by the sender.
#[derive(Debug)]
pub struct AutoPolicy {
    candidates: &'static [Route; 4],
    samples: [Option<Sample>; 4],
    since_sample: u64,
    current: Route,
}

impl Default for AutoPolicy {
    fn default() -> Self {
        AutoPolicy::new(false)
    }
}

impl AutoPolicy {
    /// `streamed`: the copy has a zstd stream (the capability was agreed),
    /// which `auto` may route runs through besides the per-run codecs.
    pub fn new(streamed: bool) -> AutoPolicy {
        AutoPolicy {
            candidates: if streamed { &STREAM_CANDIDATES } else { &CANDIDATES },
            samples: [None; 4],
            since_sample: u64::MAX,
            current: Route::Run(Codec::Lz4),
        }
    }

    /// Whether the next payload should be used to re-measure the candidates.
    pub fn wants_sample(&self) -> bool {
        self.since_sample >= RESAMPLE_BYTES
    }

    /// Measure every candidate on `data`. The stream is measured as plain
    /// zstd at its level on this run alone: its gain from history is not
    /// counted, so `auto` streams only where zstd at that level pays anyway.
    pub fn sample(&mut self, data: &[u8]) {
        for (i, r) in self.candidates.iter().enumerate() {
            let c = match r {
                Route::Run(c) => *c,
                Route::Stream => Codec::Zstd(super::stream::AUTO_LEVEL),
            };
            let t = Instant::now();
            let out = c.compress(data);
            let cpu = t.elapsed().as_secs_f64();
            self.samples[i] = Some(Sample {
                ratio: out.len() as f64 / data.len().max(1) as f64,
                cpu_per_byte: if c == Codec::None { 0.0 } else { cpu / data.len().max(1) as f64 },
            });
        }
        self.since_sample = 0;
    }

    /// Pick the route with the least time per input byte at `link_rate`
    /// (bytes/s, None while unknown), spreading per-run CPU over `workers`
    /// threads; the stream has one thread.
    pub fn choose(&mut self, link_rate: Option<f64>, workers: usize, bytes: u64) -> Route {
        self.since_sample = self.since_sample.saturating_add(bytes);
        let Some(rate) = link_rate else {
            return self.current;
        };
        let mut best = (f64::INFINITY, self.current);
        for (i, r) in self.candidates.iter().enumerate() {
            if let Some(s) = self.samples[i] {
                let threads = if *r == Route::Stream { 1 } else { workers.max(1) };
                let cost = (s.cpu_per_byte / threads as f64).max(s.ratio / rate);
                // Prefer the cheaper codec unless the other saves at least 5%.
                if cost < best.0 * 0.95 {
                    best = (cost, *r);
                }
            }
        }
        if best.1 != self.current {
            log::debug!("auto: {} from now on at a link of {:.1} MB/s", best.1, rate / 1e6);
        }
        self.current = best.1;
        self.current
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn choice_names_read_back() {
        for c in ["auto", "none", "lz4", "zstd:3", "zstd:19", "zlib:6"] {
            let choice: Choice = c.parse().unwrap();
            assert_eq!(choice.to_string(), c);
            assert_eq!(choice.to_string().parse::<Choice>().unwrap(), choice);
        }
    }

    use super::*;

    #[test]
    fn every_codec_round_trips() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
        for c in [Codec::None, Codec::Lz4, Codec::Zstd(3), Codec::Zlib(6)] {
            let z = c.compress(&data);
            assert_eq!(Codec::decompress(c.code(), z, data.len()).unwrap(), data, "{c}");
        }
    }

    #[test]
    fn corrupt_or_mis_sized_payloads_are_errors() {
        let data = vec![7u8; 10_000];
        for c in [Codec::Lz4, Codec::Zstd(3), Codec::Zlib(6)] {
            let z = c.compress(&data);
            assert!(Codec::decompress(c.code(), z.clone(), data.len() - 1).is_err(), "{c} short");
            assert!(Codec::decompress(c.code(), z[..z.len() / 2].to_vec(), data.len()).is_err(), "{c} cut");
        }
        assert!(Codec::decompress(0, data.clone(), 5).is_err());
        assert!(matches!(Codec::decompress(9, data, 5), Err(CodecError::Unknown(9))));
    }

    #[test]
    fn parse_choices() {
        assert_eq!("auto".parse::<Choice>().unwrap(), Choice::Auto);
        assert_eq!("zstd:9".parse::<Choice>().unwrap(), Choice::Fixed(Codec::Zstd(9)));
        assert_eq!("zlib".parse::<Choice>().unwrap(), Choice::Fixed(Codec::Zlib(6)));
        assert!("zstd:99".parse::<Choice>().is_err());
        assert!("lzo".parse::<Choice>().is_err());
    }

    #[test]
    fn auto_follows_the_link() {
        // Text-like data: words drawn pseudo-randomly from a small vocabulary.
        let words = ["block ", "digest ", "xen ", "guest ", "disk ", "migrate ", "lvm ", "hash ", "zero "];
        let mut x = 12345u32;
        let mut data = Vec::new();
        while data.len() < 1_000_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            data.extend_from_slice(words[(x >> 16) as usize % words.len()].as_bytes());
        }
        let mut p = AutoPolicy::default();
        assert!(p.wants_sample());
        p.sample(&data);
        // A slow link makes the smallest output win; an infinitely fast one
        // makes sending raw win.
        assert!(matches!(p.choose(Some(1_000.0), 2, 0), Route::Run(Codec::Zstd(_))));
        assert_eq!(p.choose(Some(1e15), 2, 0), Route::Run(Codec::None));
        // With a stream: it is a candidate too, never on an infinitely fast link.
        let mut p = AutoPolicy::new(true);
        p.sample(&data);
        assert_eq!(p.choose(Some(1e15), 2, 0), Route::Run(Codec::None));
    }

    /// The stream's CPU is one thread's: with many workers, a link just
    /// slow enough for zstd spread over them is too fast for the stream; on
    /// a slow link the stream's smaller output (its history) wins.
    #[test]
    fn auto_does_not_spread_the_streams_cpu_over_the_workers() {
        let none = Sample { ratio: 1.0, cpu_per_byte: 0.0 };
        let lz4 = Sample { ratio: 0.5, cpu_per_byte: 1e-9 };
        let zstd = Sample { ratio: 0.3, cpu_per_byte: 1e-8 };
        let stream = Sample { ratio: 0.2, cpu_per_byte: 1e-8 };
        let mut p = AutoPolicy::new(true);
        p.samples = [Some(none), Some(lz4), Some(stream), Some(zstd)];
        p.since_sample = 0;
        // 60 MB/s: per-run zstd on 8 threads costs max(1.25e-9, 5e-9); the
        // stream on one thread max(1e-8, 3.3e-9): per-run zstd wins.
        assert_eq!(p.choose(Some(60e6), 8, 0), Route::Run(Codec::Zstd(1)));
        // 1 MB/s: the link decides; the stream's smaller output wins.
        assert_eq!(p.choose(Some(1e6), 8, 0), Route::Stream);
        // Without a stream it is never chosen.
        let mut p = AutoPolicy::new(false);
        p.samples = [Some(none), Some(lz4), Some(zstd), Some(Sample { ratio: 0.25, cpu_per_byte: 3e-8 })];
        // (here the fourth candidate is per-run zstd 6)
        p.since_sample = 0;
        assert_eq!(p.choose(Some(1e6), 8, 0), Route::Run(Codec::Zstd(6)));
    }
}
