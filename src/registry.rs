//! The registry: providers (and, through the same mechanism, pipeline
//! components) by name.
//!
//! A [`Registry`] is the entries registered at link time (a `linkme`
//! distributed slice, filled by [`register_provider!`](crate::register_provider))
//! plus an overlay of entries registered at run time. Overlay entries shadow
//! static ones, so a test can put a double under a real provider's name and
//! take it away again.
//!
//! # Reads do not contend
//!
//! The link-time entries never change, so they live in an immutable table that
//! readers use directly while the overlay is empty (the production shape: every
//! provider compiled in, nothing registered at run time). Writers (`register`,
//! `deregister`) take the overlay's `RwLock`, change it, and publish an
//! immutable merged table through [`arc_swap::ArcSwap`]; readers then load that
//! table. No read takes a lock or bumps a counter shared with other readers, so
//! lookups on several cores scale instead of bouncing one cache line between
//! them. Tables are hashed on a few bytes of the name with a multiplier chosen
//! when the table is built so that every name has a position of its own: a
//! lookup, found or not, is one hash and one comparison for the short names
//! providers have.
//!
//! Names are interned: a name registered at run time is kept for the life of
//! the process, so listings are `&'static str` and cost one allocation.
//! Register a bounded set of names (providers, components, test doubles), not
//! one per request.
//!
//! # Duplicate static names
//!
//! Two link-time entries with the same name are never resolved silently to one
//! of them: the name is listed, but getting or creating it fails with
//! `InvalidConfig` naming both registering modules, and
//! [`Registry::duplicates`] reports every conflict. The global [`registry()`]
//! also logs them once at start. Registering an overlay entry under the name
//! resolves the conflict explicitly.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use arc_swap::ArcSwap;

use crate::backend::VoiceBackend;
use crate::config::Config;
use crate::error::{BackendError, ErrorCode, Result};
use crate::provider::BackendProvider;

/// A link-time registration: a name, the module that made it, and a constructor.
pub struct StaticEntry<T: ?Sized + 'static> {
    /// The registered name.
    pub name: &'static str,
    /// `module_path!()` of the registration, to report duplicates.
    pub module: &'static str,
    /// Makes the registered value; called once per registry.
    pub constructor: fn() -> Arc<T>,
}

impl<T: ?Sized> fmt::Debug for StaticEntry<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticEntry")
            .field("name", &self.name)
            .field("module", &self.module)
            .finish_non_exhaustive()
    }
}

/// A provider's link-time registration: its name, the module that registered it,
/// and its constructor. Made by [`register_provider!`](crate::register_provider).
pub type ProviderEntry = StaticEntry<dyn BackendProvider>;

#[doc(hidden)]
#[linkme::distributed_slice]
pub static __PROVIDERS: [ProviderEntry];

/// The providers registered at link time. The one place that reads the slice,
/// so the mechanism can change without touching providers.
fn static_providers() -> &'static [ProviderEntry] {
    &__PROVIDERS
}

/// Interns a run-time name for the life of the process.
fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    match names.get(name) {
        Some(interned) => interned,
        None => {
            let interned: &'static str = Box::leak(name.into());
            names.insert(interned);
            interned
        }
    }
}

/// Two or more link-time registrations of one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateEntry {
    /// The name registered more than once.
    pub name: &'static str,
    /// The modules that registered it, in link order.
    pub modules: Vec<&'static str>,
}

impl fmt::Display for DuplicateEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is registered {} times, by {}",
            self.name,
            self.modules.len(),
            self.modules.join(" and ")
        )
    }
}

enum Slot<T: ?Sized> {
    Ready(Arc<T>),
    /// A duplicated static name not shadowed by the overlay: index into `duplicates`.
    Conflict(usize),
}

impl<T: ?Sized> Clone for Slot<T> {
    fn clone(&self) -> Self {
        match self {
            Slot::Ready(v) => Slot::Ready(Arc::clone(v)),
            Slot::Conflict(i) => Slot::Conflict(*i),
        }
    }
}

/// A name's length and up to 16 of its bytes (the first and last 8, or 4, or
/// three sampled bytes for names under 4 bytes): equal keys mean equal names
/// for names of up to 16 bytes; longer names are compared in full.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    len: usize,
    head: u64,
    tail: u64,
}

impl Key {
    /// The key of no name (no `str` is `usize::MAX` bytes long): marks empty
    /// index positions, so a probe needs no separate emptiness test.
    const NONE: Key = Key {
        len: usize::MAX,
        head: 0,
        tail: 0,
    };

    /// The key of a name of at most 16 bytes, which it covers whole.
    #[inline]
    fn short(name: &str) -> Option<Key> {
        let b = name.as_bytes();
        let n = b.len();
        let (head, tail) = if n >= 8 {
            if n > 16 {
                return None;
            }
            (le_u64(&b[..8]), le_u64(&b[n - 8..]))
        } else if n >= 4 {
            (le_u32(&b[..4]), le_u32(&b[n - 4..]))
        } else if n > 0 {
            (
                b[0] as u64 | (b[n / 2] as u64) << 8 | (b[n - 1] as u64) << 16,
                0,
            )
        } else {
            (0, 0)
        };
        Some(Key { len: n, head, tail })
    }

    /// The key of any name: for names over 16 bytes, their length and first
    /// and last 8 bytes.
    #[inline]
    fn of(name: &str) -> Key {
        Key::short(name).unwrap_or_else(|| {
            let b = name.as_bytes();
            Key {
                len: b.len(),
                head: le_u64(&b[..8]),
                tail: le_u64(&b[b.len() - 8..]),
            }
        })
    }

    /// The key folded to one word, for hashing. Distinct keys may fold alike;
    /// the index then probes, it never confuses them.
    #[inline]
    fn fold(&self) -> u64 {
        self.head ^ self.tail.rotate_left(23) ^ self.len as u64
    }
}

#[inline]
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

#[inline]
fn le_u32(b: &[u8]) -> u64 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a) as u64
}

/// One position of a table's index: an entry, or nothing (key [`Key::NONE`]).
struct Probe<T: ?Sized> {
    key: Key,
    name: &'static str,
    slot: Option<Slot<T>>,
}

impl<T: ?Sized> Clone for Probe<T> {
    fn clone(&self) -> Self {
        Probe {
            key: self.key,
            name: self.name,
            slot: self.slot.clone(),
        }
    }
}

impl<T: ?Sized> Probe<T> {
    const EMPTY: Probe<T> = Probe {
        key: Key::NONE,
        name: "",
        slot: None,
    };
}

/// The bytes a name in a not-found message can show as they are, between
/// plain double quotes: printable ASCII other than `"` and `\`.
static QUOTES_PLAIN: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x20;
    while b < 0x7f {
        table[b] = b != b'"' as usize && b != b'\\' as usize;
        b += 1;
    }
    table
};

/// log2 of [`SMALL`].
const SMALL_BITS: u32 = 6;
/// The size of a small table's index.
const SMALL: usize = 1 << SMALL_BITS;

/// How many multipliers to try per index size before settling for probing.
const SEEDS: u64 = 32;

/// The `i`th candidate multiplier (odd, well mixed: splitmix64).
fn seed(i: u64) -> u64 {
    let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

#[inline]
fn position(key: &Key, seed: u64, shift: u32) -> usize {
    (key.fold().wrapping_mul(seed) >> shift) as usize
}

/// An immutable name table: entries sorted by name, plus an index on [`Key`].
///
/// The index is a key's folded bytes times `seed`, top bits; a key is at that
/// position or, at most `probes - 1` positions after it (no wrap-around: the
/// index has that many extra positions at its end). It is built perfect where
/// possible: for the handful of names a registry holds, a multiplier is
/// searched that gives every key a position of its own, so a lookup, found or
/// not, is one hash and one key comparison; if that works in [`SMALL`]
/// positions, the index is `small`, of a size known to the compiler. Larger
/// tables settle for linear probing with the multiplier that needs the fewest
/// probes.
struct Table<T: ?Sized> {
    names: Vec<&'static str>,
    slots: Vec<Slot<T>>,
    seed: u64,
    /// The index when it is perfect in [`SMALL`] positions (tables of up to
    /// about 20 names): its size is known here, so a lookup needs no bounds
    /// check and shifts by a constant. Then `index` is empty.
    small: Option<Box<[Probe<T>; SMALL]>>,
    shift: u32,
    probes: usize,
    index: Box<[Probe<T>]>,
    /// The end of not-found messages, from the closing quote of the name:
    /// `" is registered; available: a, b, c` (or `none`).
    not_found_tail: String,
}

impl<T: ?Sized> Table<T> {
    /// A table of `entries`, which must be sorted by name with no repeats.
    fn new(entries: Vec<(&'static str, Slot<T>)>) -> Self {
        let (names, slots): (Vec<_>, Vec<_>) = entries.into_iter().unzip();
        let keys: Vec<Key> = names.iter().map(|n| Key::of(n)).collect();
        let (seed, shift) = Self::perfect_seed(&keys).unwrap_or_else(|| {
            // Linear probing at load 1/2, with the fewest probes.
            let shift = 64 - Self::min_bits(keys.len());
            let seed = (0..SEEDS)
                .map(seed)
                .min_by_key(|&seed| Self::place(&keys, seed, shift).1)
                .expect("SEEDS > 0");
            (seed, shift)
        });
        let (at, probes) = Self::place(&keys, seed, shift);
        let mut index = vec![Probe::EMPTY; (1 << (64 - shift)) + probes - 1];
        for (i, at) in at.into_iter().enumerate() {
            index[at] = Probe {
                key: keys[i],
                name: names[i],
                slot: Some(slots[i].clone()),
            };
        }
        let small = if shift == 64 - SMALL_BITS && probes == 1 {
            let small: Box<[Probe<T>; SMALL]> = index.try_into().ok().expect("SMALL positions");
            index = Vec::new();
            Some(small)
        } else {
            None
        };
        let not_found_tail = format!(
            "\" is registered; available: {}",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        Table {
            names,
            slots,
            seed,
            small,
            shift,
            probes,
            index: index.into_boxed_slice(),
            not_found_tail,
        }
    }

    /// log2 of the smallest index size: load at most 1/2, at least 4 positions.
    fn min_bits(n: usize) -> u32 {
        (n * 2).next_power_of_two().trailing_zeros().max(2)
    }

    /// A multiplier and shift giving every key its own position, trying loads
    /// of 1/2 down to 1/16.
    fn perfect_seed(keys: &[Key]) -> Option<(u64, u32)> {
        let min_bits = Self::min_bits(keys.len());
        let mut taken = Vec::new();
        // SMALL positions first, where lookups are cheapest.
        let sizes = (min_bits <= SMALL_BITS)
            .then_some(SMALL_BITS)
            .into_iter()
            .chain((min_bits..min_bits + 4).filter(|&b| b != SMALL_BITS));
        for bits in sizes {
            let shift = 64 - bits;
            for seed in (0..SEEDS).map(seed) {
                taken.clear();
                taken.resize(1 << bits, false);
                if keys
                    .iter()
                    .all(|k| !std::mem::replace(&mut taken[position(k, seed, shift)], true))
                {
                    return Some((seed, shift));
                }
            }
        }
        None
    }

    /// Where each key goes (its position or the first free one after it), and
    /// the most positions a lookup must then look at.
    fn place(keys: &[Key], seed: u64, shift: u32) -> (Vec<usize>, usize) {
        let mut taken = vec![false; (1 << (64 - shift)) + keys.len()];
        let mut probes = 1;
        let at = keys
            .iter()
            .map(|key| {
                let home = position(key, seed, shift);
                let mut at = home;
                while taken[at] {
                    at += 1;
                }
                taken[at] = true;
                probes = probes.max(at - home + 1);
                at
            })
            .collect();
        (at, probes)
    }

    /// The value under `name`, if any.
    #[inline]
    fn find(&self, name: &str) -> Option<&Slot<T>> {
        self.probe(name).and_then(|p| p.slot.as_ref())
    }

    /// The index position holding `name`, if any.
    #[inline]
    fn probe(&self, name: &str) -> Option<&Probe<T>> {
        // The common case: a small perfect index and a name its key covers.
        if let (Some(small), Some(key)) = (&self.small, Key::short(name)) {
            let probe = &small[position(&key, self.seed, 64 - SMALL_BITS)];
            return (probe.key == key).then_some(probe);
        }
        self.probe_slow(name)
    }

    /// [`Table::probe`] for every other case: a probing index, and names
    /// compared in full where the key does not cover them.
    #[inline(never)]
    fn probe_slow(&self, name: &str) -> Option<&Probe<T>> {
        let key = Key::of(name);
        let at = position(&key, self.seed, self.shift);
        let candidates = match &self.small {
            Some(small) => &small[at..=at],
            None => &self.index[at..at + self.probes],
        };
        candidates
            .iter()
            .find(|p| p.key == key && (key.len <= 16 || p.name == name))
    }

    fn entries(&self) -> impl Iterator<Item = (&'static str, &Slot<T>)> {
        self.names.iter().copied().zip(self.slots.iter())
    }
}

/// Named values of one kind: static entries plus a run-time overlay.
///
/// [`BackendRegistry`] is the registry of providers; pipeline components use
/// the same type with their own kinds.
pub struct Registry<T: ?Sized + Send + Sync + 'static> {
    kind: &'static str,
    /// The start of not-found messages, to the opening quote of the name:
    /// `no provider named "`.
    not_found_head: String,
    statics: Table<T>,
    duplicates: Vec<DuplicateEntry>,
    /// Whether the overlay holds anything, i.e. whether readers must use `merged`.
    overlay_active: AtomicBool,
    overlay: RwLock<BTreeMap<&'static str, Arc<T>>>,
    /// The statics with the overlay applied; current while `overlay_active`.
    merged: ArcSwap<Table<T>>,
}

impl<T: ?Sized + Send + Sync + 'static> Registry<T> {
    /// A registry of `kind` (used in messages, e.g. `"provider"`) holding the
    /// given link-time entries and an empty overlay. Each entry's constructor
    /// runs once, here.
    pub fn from_static(kind: &'static str, entries: &'static [StaticEntry<T>]) -> Self {
        let mut by_name: BTreeMap<&'static str, Vec<&'static StaticEntry<T>>> = BTreeMap::new();
        for e in entries {
            by_name.entry(e.name).or_default().push(e);
        }
        let mut statics = Vec::with_capacity(by_name.len());
        let mut duplicates = Vec::new();
        for (name, group) in by_name {
            if group.len() == 1 {
                statics.push((name, Slot::Ready((group[0].constructor)())));
            } else {
                statics.push((name, Slot::Conflict(duplicates.len())));
                duplicates.push(DuplicateEntry {
                    name,
                    modules: group.iter().map(|e| e.module).collect(),
                });
            }
        }
        Registry {
            kind,
            not_found_head: format!("no {kind} named \""),
            statics: Table::new(statics),
            duplicates,
            overlay_active: AtomicBool::new(false),
            overlay: RwLock::new(BTreeMap::new()),
            merged: ArcSwap::from_pointee(Table::new(Vec::new())),
        }
    }

    /// The kind of value held, e.g. `"provider"`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Registers `value` under `name` in the overlay, shadowing a static entry of
    /// the same name. Returns what was visible under the name before (an earlier
    /// overlay entry or the static one), if anything.
    pub fn register(&self, name: &str, value: Arc<T>) -> Option<Arc<T>> {
        let name = intern(name);
        let mut overlay = self.overlay.write().unwrap_or_else(PoisonError::into_inner);
        let before = match overlay.insert(name, value) {
            Some(prev) => Some(prev),
            None => self.static_value(name),
        };
        self.publish(&overlay);
        before
    }

    /// Removes the overlay entry under `name`, revealing the static entry of the
    /// same name again if there is one. Returns the removed entry. Static
    /// entries themselves cannot be removed.
    pub fn deregister(&self, name: &str) -> Option<Arc<T>> {
        let mut overlay = self.overlay.write().unwrap_or_else(PoisonError::into_inner);
        let removed = overlay.remove(name);
        if removed.is_some() {
            self.publish(&overlay);
        }
        removed
    }

    /// Registers `value` under `name` until the returned guard is dropped, then
    /// puts back whatever overlay entry was there before. Handy in tests that
    /// share the global registry.
    #[must_use = "the entry is removed when the guard is dropped"]
    pub fn register_scoped(&self, name: &str, value: Arc<T>) -> ScopedEntry<'_, T> {
        let name = intern(name);
        let mut overlay = self.overlay.write().unwrap_or_else(PoisonError::into_inner);
        let previous = overlay.insert(name, value);
        self.publish(&overlay);
        ScopedEntry {
            registry: self,
            name,
            previous,
        }
    }

    /// Whether anything is registered under `name` (a duplicated static name counts).
    #[inline]
    pub fn is_registered(&self, name: &str) -> bool {
        self.read_small(|table| table.probe(name).is_some())
    }

    /// The value registered under `name`.
    ///
    /// Unknown names fail with `ProviderNotFound` listing what is available;
    /// a duplicated static name fails with `InvalidConfig` naming both modules.
    pub fn get(&self, name: &str) -> Result<Arc<T>> {
        self.with(name, "registry.get", |v| Ok(Arc::clone(v)))
    }

    /// Every registered name, sorted, each once.
    pub fn list(&self) -> Vec<&'static str> {
        self.read(|table| table.names.clone())
    }

    /// The duplicated link-time names, if any.
    pub fn duplicates(&self) -> &[DuplicateEntry] {
        &self.duplicates
    }

    /// Runs `f` on the table readers should use now.
    #[inline]
    fn read<R>(&self, f: impl FnOnce(&Table<T>) -> R) -> R {
        let merged;
        let table = if self.overlay_active.load(Ordering::Acquire) {
            merged = self.merged.load();
            &merged
        } else {
            &self.statics
        };
        f(table)
    }

    /// [`Registry::read`] for small `f`: the overlay case out of line, so the
    /// static path is a leaf, without the registers and stack that loading
    /// and releasing `merged` need.
    #[inline]
    fn read_small<R>(&self, f: impl Fn(&Table<T>) -> R) -> R {
        if self.overlay_active.load(Ordering::Acquire) {
            self.read_merged(f)
        } else {
            f(&self.statics)
        }
    }

    #[inline(never)]
    fn read_merged<R>(&self, f: impl Fn(&Table<T>) -> R) -> R {
        f(&self.merged.load())
    }

    /// Runs `f` on the value under `name` without cloning its `Arc` (reads stay
    /// free of shared reference-count traffic).
    fn with<R>(
        &self,
        name: &str,
        op: &'static str,
        f: impl FnOnce(&Arc<T>) -> Result<R>,
    ) -> Result<R> {
        self.read(|table| match table.find(name) {
            Some(Slot::Ready(v)) => f(v),
            Some(Slot::Conflict(i)) => Err(self.conflict_error(op, &self.duplicates[*i])),
            None => Err(self.not_found_error(op, name, table)),
        })
    }

    #[inline(never)]
    fn not_found_error(&self, op: &'static str, name: &str, table: &Table<T>) -> BackendError {
        // Built from parts made in advance rather than with `format!`: an
        // unknown name is a hot path for callers probing the registry. Names
        // that need escaping take the slower, quoting route.
        let (mut head, mut tail) = (&self.not_found_head[..], &table.not_found_tail[..]);
        let quoted;
        // Nothing shorter than 10 characters looks secret (`shown_in_error`).
        let plain = name.bytes().all(|b| QUOTES_PLAIN[b as usize])
            && (name.len() < 10 || !crate::config::looks_secret(name));
        let name = if plain {
            name
        } else {
            // Without the quotes of `head` and `tail`: `{:?}` adds its own.
            (head, tail) = (&head[..head.len() - 1], &tail[1..]);
            quoted = format!("{:?}", crate::config::shown_in_error(name));
            &quoted
        };
        let mut message = String::with_capacity(head.len() + name.len() + tail.len());
        message.push_str(head);
        message.push_str(name);
        message.push_str(tail);
        BackendError::new(op, ErrorCode::ProviderNotFound, message)
    }

    fn conflict_error(&self, op: &'static str, dup: &DuplicateEntry) -> BackendError {
        BackendError::invalid_config(
            op,
            format!(
                "{} {dup}; remove one registration or shadow the name with register()",
                self.kind
            ),
        )
    }

    fn static_value(&self, name: &str) -> Option<Arc<T>> {
        match self.statics.find(name) {
            Some(Slot::Ready(v)) => Some(Arc::clone(v)),
            _ => None,
        }
    }

    /// Rebuilds the merged table from the statics and `overlay` and publishes
    /// it. Called with the overlay's write lock held, so tables appear in order.
    fn publish(&self, overlay: &BTreeMap<&'static str, Arc<T>>) {
        if overlay.is_empty() {
            self.overlay_active.store(false, Ordering::Release);
            self.merged.store(Arc::new(Table::new(Vec::new())));
            return;
        }
        let mut entries: Vec<(&'static str, Slot<T>)> =
            Vec::with_capacity(self.statics.names.len() + overlay.len());
        let mut statics = self.statics.entries().peekable();
        let mut dynamic = overlay.iter().peekable();
        loop {
            let take_static = match (statics.peek(), dynamic.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((s, _)), Some((d, _))) => s < *d,
            };
            if take_static {
                let (name, slot) = statics.next().expect("peeked");
                entries.push((name, slot.clone()));
            } else {
                let (name, value) = dynamic.next().expect("peeked");
                // An overlay entry shadows a static one of the same name.
                if statics.peek().is_some_and(|(s, _)| s == name) {
                    statics.next();
                }
                entries.push((name, Slot::Ready(Arc::clone(value))));
            }
        }
        // The merged table is in place before readers are sent to it.
        self.merged.store(Arc::new(Table::new(entries)));
        self.overlay_active.store(true, Ordering::Release);
    }
}

impl<T: ?Sized + Send + Sync + 'static> fmt::Debug for Registry<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kind", &self.kind)
            .field("names", &self.list())
            .field("duplicates", &self.duplicates)
            .finish()
    }
}

/// An overlay entry that lasts until the guard is dropped; see
/// [`Registry::register_scoped`].
pub struct ScopedEntry<'a, T: ?Sized + Send + Sync + 'static> {
    registry: &'a Registry<T>,
    name: &'static str,
    previous: Option<Arc<T>>,
}

impl<T: ?Sized + Send + Sync + 'static> fmt::Debug for ScopedEntry<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScopedEntry")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl<T: ?Sized + Send + Sync + 'static> Drop for ScopedEntry<'_, T> {
    fn drop(&mut self) {
        let mut overlay = self
            .registry
            .overlay
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        match self.previous.take() {
            Some(prev) => {
                overlay.insert(self.name, prev);
            }
            None => {
                overlay.remove(self.name);
            }
        }
        self.registry.publish(&overlay);
    }
}

/// The registry of voice providers.
pub type BackendRegistry = Registry<dyn BackendProvider>;

impl Registry<dyn BackendProvider> {
    /// An independent registry: every provider registered at link time, and an
    /// empty overlay.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Registry::from_static("provider", static_providers())
    }

    /// Makes a backend of the provider registered under `name`.
    ///
    /// An unknown name fails with `ProviderNotFound`, listing the available
    /// names. Then `config` is validated, first by [`Config::validate_for`] the
    /// stages the provider hosts, then by
    /// the provider's [`BackendProvider::validate_config`]; any failure is
    /// `InvalidConfig` and nothing is created. Only then does the provider's
    /// [`BackendProvider::create_backend`] run.
    pub async fn create(&self, name: &str, config: &Config) -> Result<Arc<dyn VoiceBackend>> {
        const OP: &str = "registry.create";
        self.with(name, OP, |provider| {
            config
                .validate_for(provider.hosted_stages())
                .map_err(|e| e.with_op(OP))?;
            provider.validate_config(config).map_err(|e| {
                let mut e = e.with_op(OP);
                e.code = ErrorCode::InvalidConfig;
                e
            })?;
            provider.create_backend(config).map_err(|e| e.with_op(OP))
        })
    }

    /// Every registered provider name, sorted, each once.
    pub fn list_providers(&self) -> Vec<&'static str> {
        self.list()
    }

    /// The provider registered under `name`; see [`Registry::get`].
    pub fn get_provider(&self, name: &str) -> Result<Arc<dyn BackendProvider>> {
        self.with(name, "registry.get_provider", |v| Ok(Arc::clone(v)))
    }
}

/// The process-wide provider registry, made on first use (thread-safe).
///
/// It holds every provider compiled in. Link-time name conflicts are logged
/// once, here, at `error` level, and reported by [`Registry::duplicates`].
pub fn registry() -> &'static BackendRegistry {
    static REGISTRY: OnceLock<BackendRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = BackendRegistry::new();
        for dup in registry.duplicates() {
            tracing::error!(target: "voice_backends::registry", "provider {dup}");
        }
        registry
    })
}

/// Makes a backend of the provider `name` from the global [`registry()`]
/// (the specification's convenience factory).
pub async fn new_backend(name: &str, config: &Config) -> Result<Arc<dyn VoiceBackend>> {
    registry().create(name, config).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(names: &[&'static str]) -> Table<usize> {
        let mut names = names.to_vec();
        names.sort_unstable();
        names.dedup();
        Table::new(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (*n, Slot::Ready(Arc::new(i))))
                .collect(),
        )
    }

    fn value(table: &Table<usize>, name: &str) -> Option<usize> {
        match table.find(name)? {
            Slot::Ready(v) => Some(**v),
            Slot::Conflict(_) => None,
        }
    }

    fn leak(name: String) -> &'static str {
        Box::leak(name.into_boxed_str())
    }

    #[test]
    fn small_tables_get_a_perfect_index() {
        let providers = ["cartesia", "livekit", "local", "pipecat", "vapi", "vocode"];
        let t = table(&providers);
        assert!(t.small.is_some());
        for (i, n) in t.names.iter().enumerate() {
            assert_eq!(value(&t, n), Some(i));
        }
        for n in ["", "pipecatt", "pipeca", "Local", "vapj", "vocodes"] {
            assert_eq!(value(&t, n), None, "{n:?}");
        }
        for count in 0..=16 {
            let names: Vec<&'static str> = (0..count).map(|i| leak(format!("p{i}"))).collect();
            let t = table(&names);
            assert!(t.small.is_some(), "{count} names");
        }
        // The empty name, and names the key does not cover, in a small table.
        let long = "a-name-longer-than-sixteen";
        let t = table(&["", long, "b", "local"]);
        assert!(t.small.is_some());
        for (i, n) in t.names.iter().enumerate() {
            assert_eq!(value(&t, n), Some(i), "{n:?}");
        }
        // The first differs from `long` only in the middle (same length, first
        // and last 8 bytes): only the full comparison tells them apart.
        for n in [
            "a-name-lONGER-THAN-sixteen",
            "a-name-longer-than-sixteeN",
            "c",
        ] {
            assert_eq!(value(&t, n), None, "{n:?}");
        }
    }

    #[test]
    fn large_tables_probe_and_still_find_every_name() {
        let names: Vec<&'static str> = (0..300)
            .map(|i| leak(format!("component-{i}-{}", "x".repeat(i % 20))))
            .collect();
        let t = table(&names);
        assert!(t.probes > 1, "300 names are not expected to hash perfectly");
        assert!(t.small.is_none());
        for (i, n) in t.names.iter().enumerate() {
            assert_eq!(value(&t, n), Some(i));
            assert_eq!(value(&t, &format!("{n}y")), None);
        }
    }

    #[test]
    fn names_that_fold_alike_are_still_told_apart() {
        // 16-byte names: the key is bytes 0..8 and 8..16, folded as
        // head ^ rotl(tail, 23) ^ len. Flipping bit 0 of the head and
        // bit 41 (= rotr(1, 23)) of the tail keeps the fold: no multiplier can
        // give these two names positions of their own, so the index probes.
        let (a, b) = ("aaaaaaaaaaaaaaaa", "`aaaaaaaaaaaacaa");
        assert_eq!(Key::of(a).fold(), Key::of(b).fold());
        let t = table(&[a, b, "local", "pipecat"]);
        assert!(t.probes > 1);
        assert!(t.small.is_none());
        for (i, n) in t.names.iter().enumerate() {
            assert_eq!(value(&t, n), Some(i), "{n:?}");
        }
        for n in ["aaaaaaaaaaaaaaab", "`aaaaaaaaaaaacab", "", "locals"] {
            assert_eq!(value(&t, n), None, "{n:?}");
        }
    }
}
