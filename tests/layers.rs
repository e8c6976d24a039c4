//! The crate's import graph keeps to its layers (DESIGN.md, "Layers, bottom
//! to top"): arrows point down only, no two top-level modules depend on each
//! other, and a provider never reaches into another provider.
//!
//! The check reads `src/` itself (no compiler help, std only): every
//! `crate::...` path, `use crate::{a, b::c}` tree and `super::...` path
//! (resolved to the module it names), outside comments (doc comments
//! included), string literals and `#[cfg(test)]` items (test modules, inline
//! or in files of their own). `$crate::` paths inside macros are left out:
//! they expand in the caller. `src/lib.rs` is the crate's facade: its
//! re-exports are not edges, they only resolve `crate::Name` paths to the
//! module that defines `Name`.
//!
//! Run with `--nocapture` to see the graph.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, bottom to top. A module may use modules of its own layer or
/// below; no cycle may join modules of one layer.
///
/// From DESIGN.md, plus where the modules it does not name belong:
/// - `agent` (the application's agent contract: `SessionConfig` carries one),
///   `metrics` (counters the runtime fills and session event streams count
///   into) and `wake` (wakers for the session task and the server's
///   connections) depend on nothing but `error`: the bottom layer.
/// - `hooks` (auth, rate limits, retention, audio processors: what a backend
///   is configured with) sits with the traits it serves.
/// - `testing` (signals, conformance suites, fuzz targets) and `cli` use
///   everything: the top, with `server` and `bin`.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "error, audio (+ agent, demo, metrics, wake)",
        &["error", "audio", "agent", "demo", "metrics", "wake"],
    ),
    ("config", &["config"]),
    (
        "provider / backend / session (+ hooks)",
        &["provider", "backend", "session", "hooks"],
    ),
    ("registry", &["registry"]),
    ("pipeline", &["pipeline"]),
    ("runtime", &["runtime"]),
    ("providers/<name>", &["providers"]),
    ("store", &["store"]),
    (
        "server, bin (+ cli, testing)",
        &["server", "bin", "cli", "testing"],
    ),
];

// ---------------------------------------------------------------------------
// Lexing: identifiers and punctuation, with comments and literals dropped.

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// One punctuation character, or `::`.
    Punct(&'static str),
    /// A literal or a lifetime (content irrelevant here).
    Other,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
}

fn is_ident_start(c: char) -> bool {
    c == '_' || c.is_alphabetic()
}

fn is_ident_char(c: char) -> bool {
    c == '_' || c.is_alphanumeric()
}

fn punct(c: char) -> &'static str {
    match c {
        '#' => "#",
        '!' => "!",
        '[' => "[",
        ']' => "]",
        '(' => "(",
        ')' => ")",
        '{' => "{",
        '}' => "}",
        ';' => ";",
        ',' => ",",
        ':' => ":",
        '*' => "*",
        '<' => "<",
        '>' => ">",
        '=' => "=",
        '$' => "$",
        _ => "?",
    }
}

fn lex(src: &str) -> Vec<Token> {
    let c: Vec<char> = src.chars().collect();
    let n = c.len();
    let mut out = Vec::new();
    let mut i = 0;
    let mut line = 1;
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    while i < n {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < n && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < n {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
        } else if ch == '"' {
            let start = line;
            i = skip_string(&c, i + 1, &mut line);
            out.push(Token {
                tok: Tok::Other,
                line: start,
            });
        } else if ch == '\'' {
            // A char literal or a lifetime.
            if at(i + 1) == '\\' {
                i += 2;
                while i < n && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while i < n && is_ident_char(c[i]) {
                    i += 1;
                }
            }
            out.push(Token {
                tok: Tok::Other,
                line,
            });
        } else if is_ident_start(ch) || (ch == '$' && is_ident_start(at(i + 1))) {
            let start = i;
            i += 1;
            while i < n && is_ident_char(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // Raw strings, byte and C strings, byte chars, raw identifiers.
            let prefix = matches!(word.as_str(), "r" | "br" | "cr" | "b" | "c");
            if prefix && (at(i) == '"' || (at(i) == '#' && word.ends_with('r'))) {
                let mut hashes = 0;
                while at(i) == '#' {
                    hashes += 1;
                    i += 1;
                }
                if at(i) == '"' {
                    if word.ends_with('r') {
                        i += 1;
                        let start_line = line;
                        loop {
                            if i >= n {
                                break;
                            }
                            if c[i] == '\n' {
                                line += 1;
                            }
                            if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                                i += 1 + hashes;
                                break;
                            }
                            i += 1;
                        }
                        out.push(Token {
                            tok: Tok::Other,
                            line: start_line,
                        });
                    } else {
                        let start_line = line;
                        i = skip_string(&c, i + 1, &mut line);
                        out.push(Token {
                            tok: Tok::Other,
                            line: start_line,
                        });
                    }
                    continue;
                }
                // `r#ident`: a raw identifier.
                let s = i;
                while i < n && is_ident_char(c[i]) {
                    i += 1;
                }
                out.push(Token {
                    tok: Tok::Ident(c[s..i].iter().collect()),
                    line,
                });
                continue;
            }
            if word == "b" && at(i) == '\'' {
                i += 1;
                if at(i) == '\\' {
                    i += 1;
                }
                i += 1;
                while i < n && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push(Token {
                    tok: Tok::Other,
                    line,
                });
                continue;
            }
            out.push(Token {
                tok: Tok::Ident(word),
                line,
            });
        } else if ch.is_ascii_digit() {
            while i < n && (is_ident_char(c[i]) || (c[i] == '.' && at(i + 1).is_ascii_digit())) {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Other,
                line,
            });
        } else if ch == ':' && at(i + 1) == ':' {
            out.push(Token {
                tok: Tok::Punct("::"),
                line,
            });
            i += 2;
        } else {
            out.push(Token {
                tok: Tok::Punct(punct(ch)),
                line,
            });
            i += 1;
        }
    }
    out
}

/// Skips a (non-raw) string's body from just after its opening quote.
fn skip_string(c: &[char], mut i: usize, line: &mut usize) -> usize {
    while i < c.len() {
        match c[i] {
            '\\' => {
                if c.get(i + 1) == Some(&'\n') {
                    *line += 1;
                }
                i += 2;
            }
            '"' => return i + 1,
            '\n' => {
                *line += 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    i
}

// ---------------------------------------------------------------------------
// Parsing: the paths a file names, and what the facade and macros export.

/// A path a file names, resolved from the crate root.
#[derive(Clone, Debug)]
struct Reference {
    /// The module the reference is written in.
    from: Vec<String>,
    /// The path named, from the crate root (`crate::` or `super::` resolved).
    path: Vec<String>,
    line: usize,
}

#[derive(Default)]
struct FileFacts {
    refs: Vec<Reference>,
    /// Child modules declared `#[cfg(test)] mod name;`.
    test_modules: Vec<Vec<String>>,
    /// `#[macro_export] macro_rules! name`.
    exported_macros: Vec<String>,
    /// Names declared `pub` here (items, and the last segment of `pub use`s).
    pub_names: Vec<String>,
    /// `pub use` trees written at the file's top (for the facade): leaf paths.
    pub_uses: Vec<Vec<String>>,
}

fn ident(t: &[Token], i: usize) -> Option<&str> {
    match t.get(i).map(|t| &t.tok) {
        Some(Tok::Ident(s)) => Some(s),
        _ => None,
    }
}

fn is(t: &[Token], i: usize, p: &str) -> bool {
    matches!(t.get(i).map(|t| &t.tok), Some(Tok::Punct(q)) if *q == p)
}

/// Parses a use tree (or a plain path) at `j` under `prefix`; pushes every
/// leaf path. Returns the index after the tree.
fn parse_tree(
    t: &[Token],
    mut j: usize,
    mut prefix: Vec<String>,
    out: &mut Vec<Vec<String>>,
) -> usize {
    loop {
        match t.get(j).map(|t| &t.tok) {
            Some(Tok::Ident(s)) if s == "self" => {
                out.push(prefix);
                return j + 1;
            }
            Some(Tok::Ident(s)) if s == "super" && is(t, j + 1, "::") => {
                prefix.pop();
                j += 2;
            }
            Some(Tok::Ident(s)) => {
                prefix.push(s.clone());
                j += 1;
                if is(t, j, "::") {
                    j += 1;
                    continue;
                }
                if ident(t, j) == Some("as") {
                    j += 2;
                }
                out.push(prefix);
                return j;
            }
            Some(Tok::Punct("{")) => {
                j += 1;
                while j < t.len() && !is(t, j, "}") {
                    let before = j;
                    j = parse_tree(t, j, prefix.clone(), out);
                    // Past a `,`, or past anything a malformed tree left.
                    if is(t, j, ",") || j == before || !is(t, j, "}") {
                        j += 1;
                    }
                }
                return j + 1;
            }
            _ => {
                // `*`, generics, a call: the path so far.
                out.push(prefix);
                return j;
            }
        }
    }
}

/// The attribute at `i` (`#` or `#!`): its end, and whether it is exactly
/// `cfg(test)`.
fn attribute(t: &[Token], i: usize) -> Option<(usize, bool)> {
    let open = if is(t, i + 1, "[") {
        i + 1
    } else if is(t, i + 1, "!") && is(t, i + 2, "[") {
        i + 2
    } else {
        return None;
    };
    let mut depth = 0;
    let mut j = open;
    while j < t.len() {
        if is(t, j, "[") {
            depth += 1;
        } else if is(t, j, "]") {
            depth -= 1;
            if depth == 0 {
                break;
            }
        }
        j += 1;
    }
    let body: Vec<&Tok> = t[open + 1..j].iter().map(|t| &t.tok).collect();
    let cfg_test = body.len() == 4
        && body[0] == &Tok::Ident("cfg".into())
        && body[1] == &Tok::Punct("(")
        && body[2] == &Tok::Ident("test".into())
        && body[3] == &Tok::Punct(")");
    Some((j + 1, cfg_test))
}

/// The end of the item starting at `i`: after its `;`, or after the `}` that
/// closes its body (and a `;` right after it).
fn skip_item(t: &[Token], mut i: usize) -> usize {
    let mut depth = 0i32;
    while i < t.len() {
        match &t[i].tok {
            Tok::Punct("(" | "[" | "{") => depth += 1,
            Tok::Punct(")" | "]") => depth -= 1,
            Tok::Punct("}") => {
                depth -= 1;
                if depth == 0 {
                    return if is(t, i + 1, ";") { i + 2 } else { i + 1 };
                }
            }
            Tok::Punct(";") if depth == 0 => return i + 1,
            _ => {}
        }
        i += 1;
    }
    i
}

const ITEM_KEYWORDS: &[&str] = &[
    "struct", "enum", "trait", "type", "fn", "const", "static", "mod", "union",
];

fn parse_file(tokens: &[Token], module: &[String]) -> FileFacts {
    let t = tokens;
    let mut facts = FileFacts::default();
    // Inline modules open here: (name, brace depth inside them).
    let mut stack: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut macro_export = false;
    let mut i = 0;
    let current = |stack: &[(String, usize)]| -> Vec<String> {
        let mut m = module.to_vec();
        m.extend(stack.iter().map(|(n, _)| n.clone()));
        m
    };
    while i < t.len() {
        if is(t, i, "#")
            && let Some((end, cfg_test)) = attribute(t, i)
        {
            let inner = is(t, i + 1, "!");
            if cfg_test && inner && depth == 0 && stack.is_empty() {
                // `#![cfg(test)]`: the whole file is test code.
                return FileFacts::default();
            }
            if cfg_test {
                // Skip further attributes, then the item.
                let mut j = end;
                while is(t, j, "#") {
                    j = attribute(t, j).map_or(j + 1, |(e, _)| e);
                }
                let mut k = j;
                if ident(t, k) == Some("pub") {
                    k += 1;
                    if is(t, k, "(") {
                        while k < t.len() && !is(t, k, ")") {
                            k += 1;
                        }
                        k += 1;
                    }
                }
                if ident(t, k) == Some("mod") && is(t, k + 2, ";") {
                    let mut m = current(&stack);
                    m.push(ident(t, k + 1).unwrap_or_default().to_owned());
                    facts.test_modules.push(m);
                }
                i = skip_item(t, j);
                continue;
            }
            let body: Vec<&Tok> = t[i..end].iter().map(|t| &t.tok).collect();
            if body.contains(&&Tok::Ident("macro_export".into())) {
                macro_export = true;
            }
            // Paths inside attributes count (e.g. a distributed slice).
            scan_paths(t, i, end, &current(&stack), &mut facts);
            i = end;
            continue;
        }
        match &t[i].tok {
            Tok::Punct("{") => depth += 1,
            Tok::Punct("}") => {
                if stack.last().is_some_and(|(_, d)| *d == depth) {
                    stack.pop();
                }
                depth = depth.saturating_sub(1);
            }
            Tok::Ident(w) if w == "mod" => {
                if let Some(name) = ident(t, i + 1)
                    && is(t, i + 2, "{")
                {
                    stack.push((name.to_owned(), depth + 1));
                }
            }
            Tok::Ident(w) if w == "macro_rules" && is(t, i + 1, "!") => {
                if macro_export && let Some(name) = ident(t, i + 2) {
                    facts.exported_macros.push(name.to_owned());
                }
                macro_export = false;
            }
            Tok::Ident(w) if w == "pub" => {
                let mut k = i + 1;
                if is(t, k, "(") {
                    // `pub(crate)` and the like: not public.
                    i += 1;
                    continue;
                }
                while ident(t, k).is_some_and(|w| matches!(w, "unsafe" | "async" | "extern")) {
                    k += 1;
                }
                if ident(t, k) == Some("use") {
                    let mut leaves = Vec::new();
                    parse_tree(t, k + 1, Vec::new(), &mut leaves);
                    for leaf in &leaves {
                        if let Some(last) = leaf.last() {
                            facts.pub_names.push(last.clone());
                        }
                    }
                    if stack.is_empty() && depth == 0 {
                        facts.pub_uses.extend(leaves);
                    }
                } else if ident(t, k).is_some_and(|w| ITEM_KEYWORDS.contains(&w))
                    && let Some(name) = ident(t, k + 1)
                {
                    facts.pub_names.push(name.to_owned());
                }
            }
            _ => {}
        }
        scan_paths(t, i, i + 1, &current(&stack), &mut facts);
        i += 1;
    }
    facts
}

/// Records the paths that start within `t[from..to]`.
fn scan_paths(t: &[Token], from: usize, to: usize, module: &[String], facts: &mut FileFacts) {
    for i in from..to {
        let Some(word) = ident(t, i) else { continue };
        if !is(t, i + 1, "::") || (i > 0 && is(t, i - 1, "::")) {
            continue;
        }
        // `pub(in crate::x)` is a visibility, not a use.
        if i > 0 && ident(t, i - 1) == Some("in") {
            continue;
        }
        let base: Vec<String> = match word {
            "crate" | "voice_backends" => Vec::new(),
            "super" => {
                let mut base = module.to_vec();
                let mut j = i;
                while ident(t, j) == Some("super") && is(t, j + 1, "::") {
                    base.pop();
                    j += 2;
                }
                let mut leaves = Vec::new();
                parse_tree(t, j, base, &mut leaves);
                push_refs(module, leaves, t[i].line, facts);
                continue;
            }
            _ => continue,
        };
        let mut leaves = Vec::new();
        parse_tree(t, i + 2, base, &mut leaves);
        push_refs(module, leaves, t[i].line, facts);
    }
}

fn push_refs(module: &[String], leaves: Vec<Vec<String>>, line: usize, facts: &mut FileFacts) {
    for path in leaves {
        facts.refs.push(Reference {
            from: module.to_vec(),
            path,
            line,
        });
    }
}

// ---------------------------------------------------------------------------
// The crate: files, modules, and the resolution of root names.

struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    facts: FileFacts,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file under `src/` defines: `src/a/b.rs` and `src/a/b/mod.rs`
/// are `a::b`; `src/bin/*.rs` are the module `bin` (a crate of their own,
/// naming the library as `voice_backends::`).
fn module_of(rel: &Path) -> Vec<String> {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.first().map(String::as_str) == Some("bin") {
        return vec!["bin".to_owned()];
    }
    let mut module: Vec<String> = parts.clone();
    let last = module.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        module.push(stem.to_owned());
    }
    module
}

struct Crate {
    src: PathBuf,
    files: Vec<SourceFile>,
    top_modules: BTreeSet<String>,
    /// Root names (re-exports of `lib.rs`, exported macros) and the path
    /// they stand for.
    root_names: HashMap<String, Vec<String>>,
}

impl Crate {
    fn read() -> Crate {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut paths = Vec::new();
        rust_files(&src, &mut paths);
        let mut files: Vec<SourceFile> = paths
            .into_iter()
            .map(|path| {
                let text = fs::read_to_string(&path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                let module = module_of(path.strip_prefix(&src).expect("under src"));
                let facts = parse_file(&lex(&text), &module);
                SourceFile {
                    path,
                    module,
                    facts,
                }
            })
            .collect();
        // Files of `#[cfg(test)] mod name;` modules are test code.
        let test_modules: Vec<Vec<String>> = files
            .iter()
            .flat_map(|f| f.facts.test_modules.clone())
            .collect();
        files.retain(|f| !test_modules.iter().any(|m| f.module.starts_with(m)));

        let top_modules: BTreeSet<String> = files
            .iter()
            .filter_map(|f| f.module.first().cloned())
            .collect();

        // The facade's re-exports; glob re-exports resolve through the
        // globbed module's public names.
        let mut root_names: HashMap<String, Vec<String>> = HashMap::new();
        let lib = files
            .iter()
            .find(|f| f.module.is_empty())
            .expect("src/lib.rs");
        let mut globs = Vec::new();
        for leaf in &lib.facts.pub_uses {
            match leaf.last() {
                Some(name) if leaf.len() > 1 => {
                    root_names.insert(name.clone(), leaf.clone());
                }
                _ => globs.push(leaf.clone()),
            }
        }
        for glob in globs {
            for f in files.iter().filter(|f| f.module.starts_with(&glob)) {
                for name in &f.facts.pub_names {
                    root_names.entry(name.clone()).or_insert_with(|| {
                        let mut p = f.module.clone();
                        p.push(name.clone());
                        p
                    });
                }
            }
        }
        for f in &files {
            for name in &f.facts.exported_macros {
                let mut p = f.module.clone();
                p.push(name.clone());
                root_names.insert(name.clone(), p);
            }
        }
        Crate {
            src,
            files,
            top_modules,
            root_names,
        }
    }

    /// `path` with a root name replaced by what it stands for; `None` for the
    /// crate root itself and its private macro support.
    fn resolve(&self, path: &[String]) -> Option<Result<Vec<String>, String>> {
        let first = path.first()?;
        if first == "__private" {
            return None;
        }
        if self.top_modules.contains(first) {
            return Some(Ok(path.to_vec()));
        }
        match self.root_names.get(first) {
            Some(target) => {
                let mut p = target.clone();
                p.extend(path[1..].iter().cloned());
                Some(Ok(p))
            }
            None => Some(Err(path.join("::"))),
        }
    }
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, mods)| mods.contains(&module))
}

/// An edge between two top-level modules, as written at one place.
#[derive(Clone, Debug)]
struct Site {
    file: String,
    line: usize,
    path: String,
}

impl std::fmt::Display for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.path)
    }
}

/// Strongly connected components of more than one node (Tarjan).
fn cycles(edges: &BTreeMap<(String, String), Vec<Site>>) -> Vec<Vec<String>> {
    let mut nodes: BTreeSet<&str> = BTreeSet::new();
    let mut succ: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        nodes.insert(a);
        nodes.insert(b);
        succ.entry(a).or_default().push(b);
    }
    struct State<'a> {
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        on_stack: BTreeSet<&'a str>,
        stack: Vec<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(v: &'a str, succ: &BTreeMap<&'a str, Vec<&'a str>>, s: &mut State<'a>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in succ.get(v).map(Vec::as_slice).unwrap_or_default() {
            if !s.index.contains_key(w) {
                visit(w, succ, s);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = s.stack.pop().expect("on the stack");
                s.on_stack.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.out.push(scc);
            }
        }
    }
    let mut s = State {
        index: HashMap::new(),
        low: HashMap::new(),
        on_stack: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in nodes {
        if !s.index.contains_key(v) {
            visit(v, &succ, &mut s);
        }
    }
    s.out
}

#[test]
fn imports_point_down_the_layers() {
    let krate = Crate::read();
    let mut edges: BTreeMap<(String, String), Vec<Site>> = BTreeMap::new();
    let mut unresolved = Vec::new();
    let mut cross_provider = Vec::new();
    for file in krate.files.iter().filter(|f| !f.module.is_empty()) {
        let shown = Path::new("src")
            .join(file.path.strip_prefix(&krate.src).expect("under src"))
            .display()
            .to_string();
        for r in &file.facts.refs {
            let site = |path: &[String]| Site {
                file: shown.clone(),
                line: r.line,
                path: path.join("::"),
            };
            let path = match krate.resolve(&r.path) {
                None => continue,
                Some(Err(name)) => {
                    unresolved.push(site(&[name]));
                    continue;
                }
                Some(Ok(path)) => path,
            };
            let (from, to) = (&r.from[0], &path[0]);
            if from == "providers"
                && to == "providers"
                && r.from.len() > 1
                && path.len() > 1
                && r.from[1] != path[1]
            {
                cross_provider.push(format!(
                    "{}: providers::{} -> providers::{}",
                    site(&path),
                    r.from[1],
                    path[1]
                ));
            }
            if from != to {
                edges
                    .entry((from.clone(), to.clone()))
                    .or_default()
                    .push(site(&path));
            }
        }
    }

    let mut report = String::new();
    let mut graph = String::new();
    let mut failures = 0;
    writeln!(
        graph,
        "import graph between top-level modules (edges: uses):"
    )
    .unwrap();
    for ((a, b), sites) in &edges {
        writeln!(graph, "  {a} -> {b} ({} uses)", sites.len()).unwrap();
    }

    let unplaced: BTreeSet<&String> = krate
        .top_modules
        .iter()
        .filter(|m| layer_of(m).is_none())
        .collect();
    if !unplaced.is_empty() {
        failures += unplaced.len();
        writeln!(
            report,
            "modules missing from LAYERS (place each in a layer): {unplaced:?}"
        )
        .unwrap();
    }
    if !unresolved.is_empty() {
        failures += unresolved.len();
        writeln!(report, "paths this check could not resolve to a module:").unwrap();
        for s in &unresolved {
            writeln!(report, "  {s}").unwrap();
        }
    }

    for scc in cycles(&edges) {
        failures += 1;
        writeln!(
            report,
            "cycle between top-level modules: {}",
            scc.join(", ")
        )
        .unwrap();
        for ((a, b), sites) in &edges {
            if scc.contains(a) && scc.contains(b) {
                for s in sites {
                    writeln!(report, "  {a} -> {b}: {s}").unwrap();
                }
            }
        }
    }

    for ((a, b), sites) in &edges {
        let (Some(la), Some(lb)) = (layer_of(a), layer_of(b)) else {
            continue;
        };
        if lb > la {
            failures += 1;
            writeln!(
                report,
                "upward import: {a} ({}) -> {b} ({})",
                LAYERS[la].0, LAYERS[lb].0
            )
            .unwrap();
            for s in sites {
                writeln!(report, "  {s}").unwrap();
            }
        }
    }

    if !cross_provider.is_empty() {
        failures += cross_provider.len();
        writeln!(report, "a provider names another provider:").unwrap();
        for s in &cross_provider {
            writeln!(report, "  {s}").unwrap();
        }
    }

    println!("{graph}");
    assert!(
        failures == 0,
        "{failures} layer violations\n{report}\n{graph}"
    );
}

/// The parser itself: the forms of path the check must see, and those it
/// must not.
#[test]
fn the_check_reads_paths_as_written() {
    let src = r##"
        //! crate::doc::comment is not a use.
        use crate::{alpha, beta::{gamma, self}};
        use super::delta::Thing;
        /* crate::block::comment */
        fn f() {
            let s = "crate::in_a_string";
            let r = r#"crate::raw"#;
            let c = '{';
            crate::epsilon::call();
            pub(in crate::visibility) struct X;
        }
        macro_rules! m { () => { $crate::dollar::Path } }
        #[cfg(test)]
        mod tests {
            use crate::test_only;
        }
        mod inline {
            use super::super::zeta;
        }
    "##;
    let facts = parse_file(&lex(src), &["here".to_owned(), "file".to_owned()]);
    let paths: Vec<String> = facts.refs.iter().map(|r| r.path.join("::")).collect();
    assert_eq!(
        paths,
        [
            "alpha",
            "beta::gamma",
            "beta",
            "here::delta::Thing",
            "epsilon::call",
            "here::zeta",
        ]
    );
    assert_eq!(facts.refs[0].line, 3);
    assert_eq!(facts.refs[4].line, 10);
}
