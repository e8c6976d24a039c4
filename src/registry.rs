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
//! Writers (`register`, `deregister`) take the overlay's `RwLock`, change it, and
//! publish an immutable, sorted snapshot of the merged view through
//! [`arc_swap::ArcSwap`]. Readers (`is_registered`, `get`, `create`, `list`)
//! only load the current snapshot: no lock and no shared reader counter, so
//! lookups on several cores scale instead of bouncing one cache line between
//! them. Writes are rare and cost one rebuild of the (small) snapshot.
//!
//! # Duplicate static names
//!
//! Two link-time entries with the same name are never resolved silently to one
//! of them: the name is listed, but getting or creating it fails with
//! `InvalidConfig` naming both registering modules, and
//! [`Registry::duplicates`] reports every conflict. The global [`registry()`]
//! also logs them once at start. Registering an overlay entry under the name
//! resolves the conflict explicitly.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use arc_swap::ArcSwap;

use crate::backend::VoiceBackend;
use crate::config::Config;
use crate::error::{BackendError, ErrorCode, Result};
use crate::provider::{BackendProvider, ProviderEntry};

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

#[doc(hidden)]
#[linkme::distributed_slice]
pub static __PROVIDERS: [ProviderEntry];

/// The providers registered at link time. The one place that reads the slice,
/// so the mechanism can change without touching providers.
fn static_providers() -> &'static [ProviderEntry] {
    &__PROVIDERS
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

/// The merged, sorted view readers see.
struct Snapshot<T: ?Sized> {
    entries: Vec<(Box<str>, Slot<T>)>,
    /// `"a, b, c"` (or `"none"`), ready for not-found messages.
    available: String,
}

impl<T: ?Sized> Snapshot<T> {
    fn find(&self, name: &str) -> Option<&Slot<T>> {
        self.entries
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()
            .map(|i| &self.entries[i].1)
    }
}

/// Named values of one kind: static entries plus a run-time overlay.
///
/// [`BackendRegistry`] is the registry of providers; pipeline components use
/// the same type with their own kinds.
pub struct Registry<T: ?Sized + Send + Sync + 'static> {
    kind: &'static str,
    statics: Vec<(&'static str, Slot<T>)>,
    duplicates: Vec<DuplicateEntry>,
    overlay: RwLock<BTreeMap<String, Arc<T>>>,
    snapshot: ArcSwap<Snapshot<T>>,
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
        let registry = Registry {
            kind,
            statics,
            duplicates,
            overlay: RwLock::new(BTreeMap::new()),
            snapshot: ArcSwap::from_pointee(Snapshot {
                entries: Vec::new(),
                available: String::new(),
            }),
        };
        registry.publish(&BTreeMap::new());
        registry
    }

    /// The kind of value held, e.g. `"provider"`.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// Registers `value` under `name` in the overlay, shadowing a static entry of
    /// the same name. Returns what was visible under the name before (an earlier
    /// overlay entry or the static one), if anything.
    pub fn register(&self, name: impl Into<String>, value: Arc<T>) -> Option<Arc<T>> {
        let name = name.into();
        let mut overlay = self.overlay.write().unwrap_or_else(PoisonError::into_inner);
        let before = match overlay.insert(name.clone(), value) {
            Some(prev) => Some(prev),
            None => self.static_value(&name),
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
    pub fn register_scoped(&self, name: impl Into<String>, value: Arc<T>) -> ScopedEntry<'_, T> {
        let name = name.into();
        let mut overlay = self.overlay.write().unwrap_or_else(PoisonError::into_inner);
        let previous = overlay.insert(name.clone(), value);
        self.publish(&overlay);
        ScopedEntry {
            registry: self,
            name,
            previous,
        }
    }

    /// Whether anything is registered under `name` (a duplicated static name counts).
    pub fn is_registered(&self, name: &str) -> bool {
        self.snapshot.load().find(name).is_some()
    }

    /// The value registered under `name`.
    ///
    /// Unknown names fail with `ProviderNotFound` listing what is available;
    /// a duplicated static name fails with `InvalidConfig` naming both modules.
    pub fn get(&self, name: &str) -> Result<Arc<T>> {
        self.with(name, "registry.get", |v| Ok(Arc::clone(v)))
    }

    /// Every registered name, sorted, each once.
    pub fn list(&self) -> Vec<String> {
        self.snapshot
            .load()
            .entries
            .iter()
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// The duplicated link-time names, if any.
    pub fn duplicates(&self) -> &[DuplicateEntry] {
        &self.duplicates
    }

    /// Runs `f` on the value under `name` without cloning its `Arc` (reads stay
    /// free of shared reference-count traffic).
    fn with<R>(
        &self,
        name: &str,
        op: &'static str,
        f: impl FnOnce(&Arc<T>) -> Result<R>,
    ) -> Result<R> {
        let snapshot = self.snapshot.load();
        match snapshot.find(name) {
            Some(Slot::Ready(v)) => f(v),
            Some(Slot::Conflict(i)) => Err(self.conflict_error(op, &self.duplicates[*i])),
            None => Err(BackendError::new(
                op,
                ErrorCode::ProviderNotFound,
                format!(
                    "no {} named {:?} is registered; available: {}",
                    self.kind, name, snapshot.available
                ),
            )),
        }
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
        self.statics
            .binary_search_by(|(n, _)| (*n).cmp(name))
            .ok()
            .and_then(|i| match &self.statics[i].1 {
                Slot::Ready(v) => Some(Arc::clone(v)),
                Slot::Conflict(_) => None,
            })
    }

    /// Rebuilds the merged view from the statics and `overlay` and publishes it.
    /// Called with the overlay's write lock held, so snapshots appear in order.
    fn publish(&self, overlay: &BTreeMap<String, Arc<T>>) {
        let mut entries: Vec<(Box<str>, Slot<T>)> =
            Vec::with_capacity(self.statics.len() + overlay.len());
        let mut statics = self.statics.iter().peekable();
        let mut dynamic = overlay.iter().peekable();
        loop {
            let take_static = match (statics.peek(), dynamic.peek()) {
                (None, None) => break,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((s, _)), Some((d, _))) => *s < d.as_str(),
            };
            if take_static {
                let (name, slot) = statics.next().expect("peeked");
                entries.push(((*name).into(), slot.clone()));
            } else {
                let (name, value) = dynamic.next().expect("peeked");
                // An overlay entry shadows a static one of the same name.
                if statics.peek().is_some_and(|(s, _)| *s == name.as_str()) {
                    statics.next();
                }
                entries.push((name.as_str().into(), Slot::Ready(Arc::clone(value))));
            }
        }
        let available = if entries.is_empty() {
            "none".to_owned()
        } else {
            entries
                .iter()
                .map(|(n, _)| &**n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        self.snapshot
            .store(Arc::new(Snapshot { entries, available }));
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
    name: String,
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
                overlay.insert(std::mem::take(&mut self.name), prev);
            }
            None => {
                overlay.remove(&self.name);
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
    /// names. Then `config` is validated, first by [`Config::validate`], then by
    /// the provider's [`BackendProvider::validate_config`]; any failure is
    /// `InvalidConfig` and nothing is created. Only then does the provider's
    /// [`BackendProvider::create_backend`] run.
    pub async fn create(&self, name: &str, config: &Config) -> Result<Arc<dyn VoiceBackend>> {
        const OP: &str = "registry.create";
        self.with(name, OP, |provider| {
            config.validate().map_err(|e| e.with_op(OP))?;
            provider.validate_config(config).map_err(|e| {
                let mut e = e.with_op(OP);
                e.code = ErrorCode::InvalidConfig;
                e
            })?;
            provider.create_backend(config).map_err(|e| e.with_op(OP))
        })
    }

    /// Every registered provider name, sorted, each once.
    pub fn list_providers(&self) -> Vec<String> {
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
