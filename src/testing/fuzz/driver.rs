//! The driver: seeds, mutations from a seeded PRNG, panics caught and
//! reported, findings written to files.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use super::targets::*;

/// How [`run`] runs a target.
#[derive(Clone, Debug)]
pub struct Options {
    /// Inputs to run, the seeds included.
    pub inputs: u64,
    /// The PRNG seed: the same seed runs the same inputs.
    pub seed: u64,
    /// Longest input made, in bytes.
    pub max_len: usize,
    /// Go on after a crash (each distinct panic is reported once).
    pub keep_going: bool,
    /// An input taking longer than this is reported as slow.
    pub slow: Duration,
    /// Where crashing and slow inputs are written (`None`: not written).
    pub artifacts: Option<PathBuf>,
    /// Extra seeds: every file of `<corpus>/<target name>/`, when it exists.
    pub corpus: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inputs: 1_000_000,
            seed: 1,
            max_len: 4096,
            keep_going: false,
            slow: Duration::from_secs(1),
            artifacts: Some(std::env::temp_dir().join("voice-backends-fuzz")),
            corpus: None,
        }
    }
}

/// An input that panicked, or one that took longer than [`Options::slow`].
#[derive(Clone, Debug)]
pub struct Finding {
    /// The panic message and location, or how long the input took.
    pub message: String,
    /// The input.
    pub input: Vec<u8>,
    /// The file it was written to.
    pub path: Option<PathBuf>,
}

impl Finding {
    /// The first 200 bytes of the input, escaped.
    pub fn preview(&self) -> String {
        let end = self.input.len().min(200);
        let more = if end < self.input.len() { "..." } else { "" };
        format!("{}{more}", self.input[..end].escape_ascii())
    }
}

/// What a run of one target did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The target's name.
    pub target: &'static str,
    /// Inputs run, seeds included.
    pub inputs: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs the decoder refused.
    pub rejected: u64,
    /// Accepted inputs that were mutants (not seeds).
    pub mutants_accepted: u64,
    /// Refused inputs that were mutants.
    pub mutants_rejected: u64,
    /// Inputs kept at the end (seeds and kept mutants).
    pub corpus: usize,
    /// Each distinct panic, with the first input that raised it.
    pub crashes: Vec<Finding>,
    /// Inputs that panicked, the repeats of a known panic included.
    pub crashed_inputs: u64,
    /// Inputs slower than [`Options::slow`] (the first 10).
    pub slow: Vec<Finding>,
    /// The slowest input's time.
    pub slowest: Duration,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Report {
    /// Inputs per second.
    pub fn rate(&self) -> f64 {
        self.inputs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// A splitmix64 generator: small, fast and deterministic.
pub(super) struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// FNV-1a, for naming files and telling outcomes apart.
pub(super) fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

thread_local! {
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that, on a thread running a target, records
/// the message and location instead of printing them; on other threads it
/// calls the hook that was there before.
pub(super) fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAPTURING.with(Cell::get) {
                return previous(info);
            }
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            PANIC.with(|p| *p.borrow_mut() = Some(format!("{message}{at}")));
        }));
    });
}

/// Runs one input: the outcome, or the panic's message and location.
pub fn run_one(target: &Target, input: &[u8]) -> Result<Outcome, String> {
    install_panic_hook();
    CAPTURING.with(|c| c.set(true));
    let result = catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    CAPTURING.with(|c| c.set(false));
    result.map_err(|_| {
        PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "a panic".into())
    })
}

/// A short class of an outcome: refusals that differ only in numbers or
/// quoted text are one class.
pub(super) fn class(outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Accepted(kind) => fnv(kind.as_bytes()),
        Outcome::Rejected(reason) => {
            let cut = reason.split(['"', '`', '\'']).next().unwrap_or("");
            let kept: Vec<u8> = cut
                .bytes()
                .filter(|b| !b.is_ascii_digit())
                .take(64)
                .collect();
            !fnv(&kept)
        }
    }
}

pub(super) fn save(options: &Options, target: &str, what: &str, input: &[u8]) -> Option<PathBuf> {
    let dir = options.artifacts.as_ref()?.join(target);
    let path = dir.join(format!("{what}-{:016x}", fnv(input)));
    std::fs::create_dir_all(&dir).ok()?;
    std::fs::write(&path, input).ok()?;
    Some(path)
}

pub(super) fn read_corpus(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

/// Mutants kept beyond the seeds, in each of the two pools.
pub(super) const MAX_KEPT: usize = 1024;

/// Runs `target` for `options.inputs` inputs: first the seeds, then mutants.
/// Inputs are kept in two pools, accepted and refused: a mutant joins its
/// pool when its outcome is of a new kind (an accepted one also at random,
/// one in 16), and three parents in four come from the accepted pool, so
/// most mutants are near-misses of valid input. Stops at the first crash
/// unless `options.keep_going`.
pub fn run(target: &Target, options: &Options) -> Report {
    let mut rng = Rng(options.seed ^ fnv(target.name.as_bytes()));
    let mut seeds = (target.seeds)();
    if let Some(dir) = &options.corpus {
        seeds.extend(read_corpus(&dir.join(target.name)));
    }
    seeds.iter_mut().for_each(|s| s.truncate(options.max_len));
    if seeds.is_empty() {
        seeds.push(Vec::new());
    }
    // Accepted, refused; and how many seeds each holds (never replaced).
    let mut pools: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    let mut fixed = [0, 0];
    let mut classes = HashSet::new();
    let mut crash_messages = HashSet::new();
    let mut report = Report {
        target: target.name,
        ..Report::default()
    };
    let start = Instant::now();
    while report.inputs < options.inputs {
        let seed = report.inputs < seeds.len() as u64;
        let input = if seed {
            seeds[report.inputs as usize].clone()
        } else {
            if report.inputs == seeds.len() as u64 {
                fixed = [pools[0].len(), pools[1].len()];
            }
            mutant(&mut rng, &pools, target, options.max_len)
        };
        report.inputs += 1;
        let began = Instant::now();
        let result = run_one(target, &input);
        let took = began.elapsed();
        report.slowest = report.slowest.max(took);
        if took > options.slow && report.slow.len() < 10 {
            report.slow.push(Finding {
                message: format!("took {took:.2?}"),
                path: save(options, target.name, "slow", &input),
                input: input.clone(),
            });
        }
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(message) => {
                report.crashed_inputs += 1;
                if crash_messages.insert(message.clone()) {
                    report.crashes.push(Finding {
                        message,
                        path: save(options, target.name, "crash", &input),
                        input,
                    });
                }
                if options.keep_going {
                    continue;
                }
                break;
            }
        };
        let accepted = matches!(outcome, Outcome::Accepted(_));
        report.accepted += u64::from(accepted);
        report.rejected += u64::from(!accepted);
        report.mutants_accepted += u64::from(accepted && !seed);
        report.mutants_rejected += u64::from(!accepted && !seed);
        let new = classes.insert(class(&outcome));
        let pool = usize::from(!accepted);
        if seed || new || (accepted && rng.below(16) == 0) {
            if seed || pools[pool].len() < fixed[pool] + MAX_KEPT {
                pools[pool].push(input);
            } else {
                let at = fixed[pool] + rng.below(MAX_KEPT);
                pools[pool][at] = input;
            }
        }
    }
    report.corpus = pools[0].len() + pools[1].len();
    report.elapsed = start.elapsed();
    report
}

// --- mutations -------------------------------------------------------------

/// A random entry of a random non-empty pool; of the accepted pool (the
/// first) three times in four.
pub(super) fn pick_input<'a>(rng: &mut Rng, pools: &'a [Vec<Vec<u8>>; 2]) -> &'a Vec<u8> {
    static NOTHING: Vec<u8> = Vec::new();
    if pools.iter().all(Vec::is_empty) {
        return &NOTHING;
    }
    let pool = if pools[1].is_empty() || (!pools[0].is_empty() && rng.below(4) != 0) {
        &pools[0]
    } else {
        &pools[1]
    };
    rng.pick(pool)
}

/// A mutant of a pool entry: usually one mutation, sometimes up to eight;
/// never the entry itself.
pub(super) fn mutant(
    rng: &mut Rng,
    pools: &[Vec<Vec<u8>>; 2],
    target: &Target,
    max_len: usize,
) -> Vec<u8> {
    let parent = pick_input(rng, pools);
    let mut data = parent.clone();
    loop {
        let count = if rng.below(4) == 0 {
            1 << rng.below(4)
        } else {
            1
        };
        for _ in 0..count {
            mutate(rng, &mut data, pools, target);
        }
        data.truncate(max_len);
        if data != *parent {
            return data;
        }
    }
}

/// A range `start..end` of `data`, at most `max` long.
pub(super) fn range(rng: &mut Rng, len: usize, max: usize) -> (usize, usize) {
    let start = rng.below(len + 1);
    let end = start + rng.below((len - start).min(max) + 1);
    (start, end)
}

pub(super) fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

pub(super) fn mutate(
    rng: &mut Rng,
    data: &mut Vec<u8>,
    pools: &[Vec<Vec<u8>>; 2],
    target: &Target,
) {
    let len = data.len();
    let at = rng.below(len + 1);
    match rng.below(if target.binary { 13 } else { 12 }) {
        0 if len > 0 => data[at.min(len - 1)] ^= 1 << rng.below(8),
        1 if len > 0 => {
            let random = rng.next() as u8;
            data[at.min(len - 1)] = *rng.pick(&[0, 0xff, 0x7f, 0x80, b'"', b'\\', random]);
        }
        2 => {
            let bytes: Vec<u8> = (0..1 + rng.below(8)).map(|_| rng.next() as u8).collect();
            data.splice(at..at, bytes);
        }
        3 => {
            let (s, e) = range(rng, len, 64);
            data.drain(s..e);
        }
        4 => {
            let (s, e) = range(rng, len, 256);
            let copy = data[s..e].to_vec();
            for _ in 0..1 + rng.below(4) {
                data.splice(at..at, copy.iter().copied());
            }
        }
        5 => {
            let (s, e) = range(rng, len, 64);
            let copy = data[s..e].to_vec();
            let to = rng.below(len - copy.len() + 1);
            data[to..to + copy.len()].copy_from_slice(&copy);
        }
        6 => {
            let other = pick_input(rng, pools);
            let from = rng.below(other.len() + 1);
            data.truncate(at);
            data.extend_from_slice(&other[from..]);
        }
        7 | 8 => {
            let tokens = if rng.below(3) == 0 {
                COMMON_TOKENS
            } else {
                target.tokens
            };
            if let Some(token) = tokens.get(rng.below(tokens.len())) {
                if rng.below(2) == 0 {
                    let (s, e) = range(rng, len, 8);
                    data.splice(s..e, token.bytes());
                } else {
                    data.splice(at..at, token.bytes());
                }
            }
        }
        9 => {
            // A number replaced by an odd one, or one inserted.
            let number = if rng.below(8) == 0 {
                "9".repeat(20 + rng.below(400))
            } else {
                (*rng.pick(NUMBERS)).to_owned()
            };
            let s = data[at..]
                .iter()
                .position(u8::is_ascii_digit)
                .map_or(at, |p| at + p);
            let e = data[s..]
                .iter()
                .position(|b| !b.is_ascii_digit() && !b".eE+-".contains(b))
                .map_or(data.len(), |p| s + p);
            data.splice(s..e, number.bytes());
        }
        10 => {
            // Nesting, a few hundred levels deep at most.
            if let Some((open, close)) = target.nests.get(rng.below(target.nests.len())) {
                let deep = rng.below(4) == 0;
                let depth = 1 + rng.below(if deep { 300 } else { 16 });
                let to = at + rng.below(len - at + 1);
                data.splice(to..to, close.repeat(depth).into_bytes());
                data.splice(at..at, open.repeat(depth).into_bytes());
            }
        }
        11 => data.truncate(at),
        12 => {
            // A protobuf varint: a field key, a length or a value, often huge.
            let value = match rng.below(6) {
                0 => u64::MAX,
                1 => u64::from(u32::MAX) + rng.below(3) as u64,
                2 => (rng.below(8) as u64 + 1) << 3 | rng.below(8) as u64,
                3 => (len as u64 + rng.below(3) as u64).saturating_sub(1),
                4 => 1 << rng.below(64),
                _ => rng.next() >> rng.below(64),
            };
            let mut bytes = varint(value);
            if rng.below(4) == 0 {
                bytes.pop();
                bytes.push(0x80);
            }
            let (s, e) = if rng.below(2) == 0 {
                (at, at)
            } else {
                // Over the varint starting at `at`.
                let end = data[at..]
                    .iter()
                    .position(|b| b & 0x80 == 0)
                    .map_or(len, |p| at + p + 1);
                (at, end)
            };
            data.splice(s..e, bytes);
        }
        _ => data.insert(at, rng.next() as u8),
    }
}
