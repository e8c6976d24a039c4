//! A pre-scan of config text for nesting deeper than [`MAX_NESTING_DEPTH`],
//! run before any parser sees the text.
//!
//! The YAML parser takes time quadratic in the depth of nested flow
//! collections (a 40,000-level file took seconds), and the three parsers
//! each stop at a recursion limit of their own, with messages of their own.
//! Each scan here reads the text once, in linear time, and returns the byte
//! offset at which a collection (table, mapping, array or list) opens
//! [`MAX_NESTING_DEPTH`] + 1 levels deep, the document itself being level 1.
//!
//! Brackets inside quoted strings, comments and YAML block scalars (`|`, `>`)
//! do not count. The scans follow the structure closely enough never to
//! refuse a config nested within the limit, but for contrived input they may
//! count a level the parser would not (e.g. `- ` starting a line that
//! continues a plain YAML scalar): the limit is far above any real config.

use super::MAX_NESTING_DEPTH;

/// The message of the error for text nested too deeply.
pub(super) fn too_deep_message() -> String {
    format!("nested deeper than the limit of {MAX_NESTING_DEPTH} levels of tables and lists")
}

/// Whether `text`, in the format named `format` (`TOML`, `YAML` or `JSON`),
/// nests deeper than [`MAX_NESTING_DEPTH`]; `false` for any other name.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub(crate) fn nesting_exceeded(text: &str, format: &str) -> bool {
    match format {
        "TOML" => toml(text).is_some(),
        "YAML" => yaml(text).is_some(),
        "JSON" => json(text).is_some(),
        _ => false,
    }
}

/// Where JSON text first opens an array or object past the limit.
pub(super) fn json(input: &str) -> Option<usize> {
    let b = input.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Where TOML text first opens a table or array past the limit: table
/// headers (`[a.b]` is level 3, `[[a]]` too: the array, then its table),
/// dotted keys (`a.b = 1` opens table `a` one level down) and inline arrays
/// and tables.
pub(super) fn toml(input: &str) -> Option<usize> {
    let b = input.as_bytes();
    // The level of the table the current line's keys go in.
    let mut table = 1;
    // The open inline arrays and tables: whether each is a table, and its level.
    let mut open: Vec<(bool, usize)> = Vec::new();
    // Whether a key is being read (before its `=`), and the dots in it so far.
    let mut in_key = true;
    let mut dots = 0;
    // Whether anything but white space came before on this line.
    let mut line_started = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let level = open.last().map_or(table, |&(_, level)| level);
        match c {
            b'\n' => {
                if open.is_empty() {
                    in_key = true;
                    dots = 0;
                }
                line_started = false;
                i += 1;
                continue;
            }
            b' ' | b'\t' | b'\r' => {
                i += 1;
                continue;
            }
            b'#' => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |n| i + n);
                continue;
            }
            b'"' | b'\'' => {
                i = toml_string_end(b, i);
                line_started = true;
                continue;
            }
            b'[' if open.is_empty() && !line_started => {
                // A table header: its dotted key, up to `]`.
                let array = b.get(i + 1) == Some(&b'[');
                let mut j = i + 1 + usize::from(array);
                let mut segments = 1;
                while j < b.len() && !matches!(b[j], b']' | b'\n') {
                    match b[j] {
                        b'"' | b'\'' => {
                            j = toml_string_end(b, j);
                            continue;
                        }
                        b'.' => segments += 1,
                        _ => {}
                    }
                    j += 1;
                }
                table = 1 + segments + usize::from(array);
                if table > MAX_NESTING_DEPTH {
                    return Some(i);
                }
                in_key = true;
                dots = 0;
                line_started = true;
                // The closing brackets are skipped as stray ones below.
                i = j;
                continue;
            }
            b'.' if in_key => dots += 1,
            b'=' if in_key => {
                in_key = false;
                if level + dots > MAX_NESTING_DEPTH {
                    return Some(i);
                }
            }
            b'[' | b'{' if !in_key => {
                let level = level + dots + 1;
                if level > MAX_NESTING_DEPTH {
                    return Some(i);
                }
                open.push((c == b'{', level));
                in_key = c == b'{';
                dots = 0;
            }
            b']' | b'}' if !open.is_empty() => {
                open.pop();
                in_key = false;
                dots = 0;
            }
            b',' if open.last().is_some_and(|&(is_table, _)| is_table) => {
                in_key = true;
                dots = 0;
            }
            _ => {}
        }
        line_started = true;
        i += 1;
    }
    None
}

/// The index just past the TOML string opening at `b[i]` (a quote): basic
/// `"…"` and literal `'…'` strings end at their line's end at the latest,
/// multi-line `"""…"""` and `'''…'''` ones may span lines.
fn toml_string_end(b: &[u8], i: usize) -> usize {
    let quote = b[i];
    let escapes = quote == b'"';
    if b[i..].starts_with(&[quote; 3]) {
        let mut j = i + 3;
        while j < b.len() {
            if escapes && b[j] == b'\\' {
                j += 2;
            } else if b[j..].starts_with(&[quote; 3]) {
                // Up to two more quotes just before the end belong to the string.
                let mut end = j + 3;
                while end < b.len() && end < j + 5 && b[end] == quote {
                    end += 1;
                }
                return end;
            } else {
                j += 1;
            }
        }
        return b.len();
    }
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' if escapes => j += 2,
            b'\n' => return j,
            c if c == quote => return j + 1,
            _ => j += 1,
        }
    }
    b.len()
}

/// Where YAML text first opens a collection past the limit: block
/// mappings and sequences (by indentation and `- `), and flow ones (`[`,
/// `{`).
pub(super) fn yaml(input: &str) -> Option<usize> {
    let mut scan = Yaml::default();
    let mut start = 0;
    for line in input.split('\n') {
        if let Some(at) = scan.line(line.as_bytes()) {
            return Some(start + at);
        }
        start += line.len() + 1;
    }
    None
}

/// The state of the YAML scan between lines.
#[derive(Default)]
struct Yaml {
    /// The open block collections: the column of each, and whether it is a
    /// sequence.
    blocks: Vec<(usize, bool)>,
    /// How many flow collections are open.
    flow: usize,
    /// The quote of a quoted scalar that runs on past its line.
    quote: Option<u8>,
    /// While in a block scalar: the column its lines are indented past
    /// (-1 at the top level).
    block_scalar: Option<isize>,
    /// In flow collections, the last character other than white space: a
    /// quote after `[`, `{`, `,`, `:` or `?` opens a quoted scalar, one
    /// inside a plain scalar does not.
    last: u8,
}

/// Whether `b[i]` is the end of the line or white space.
fn separates(b: &[u8], i: usize) -> bool {
    b.get(i).is_none_or(|c| matches!(c, b' ' | b'\t' | b'\r'))
}

/// The index of the first character from `i` on that is not a space or tab.
fn skip_blanks(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

/// The index just past the closing quote of the quoted scalar that starts
/// with the quote `b[i]`, if it closes on this line.
fn quoted_end(b: &[u8], i: usize, quote: u8) -> Option<usize> {
    let mut j = i;
    while j < b.len() {
        match b[j] {
            b'\\' if quote == b'"' => j += 2,
            c if c == quote => {
                // `''` inside a single-quoted scalar is an escaped quote.
                if quote == b'\'' && b.get(j + 1) == Some(&b'\'') {
                    j += 2;
                } else {
                    return Some(j + 1);
                }
            }
            _ => j += 1,
        }
    }
    None
}

impl Yaml {
    fn depth(&self) -> usize {
        self.blocks.len() + self.flow
    }

    /// Scans one line (without its `\n`); the offset in it where the limit
    /// is passed, if it is.
    fn line(&mut self, b: &[u8]) -> Option<usize> {
        let indent = b.iter().take_while(|&&c| c == b' ').count();
        let blank = b[indent..]
            .iter()
            .all(|c| matches!(c, b' ' | b'\t' | b'\r'));
        if let Some(parent) = self.block_scalar {
            if blank || indent as isize > parent {
                return None;
            }
            self.block_scalar = None;
        }
        if self.quote.is_some() || self.flow > 0 {
            return self.inline(b, 0);
        }
        if blank || b[indent] == b'#' {
            return None;
        }
        if indent == 0 {
            if b[0] == b'%' {
                return None;
            }
            if (b.starts_with(b"---") || b.starts_with(b"...")) && separates(b, 3) {
                // A new document.
                self.blocks.clear();
                return self.node(b, skip_blanks(b, 3), -1);
            }
        }
        // Close the block collections this line is outside of; a key at the
        // column of a sequence ends it (the sequence was a key's value).
        let entry = b[indent] == b'-' && separates(b, indent + 1);
        while let Some(&(column, sequence)) = self.blocks.last() {
            if column > indent || (column == indent && sequence && !entry) {
                self.blocks.pop();
            } else {
                break;
            }
        }
        let owner = self
            .blocks
            .last()
            .map_or(-1, |&(column, _)| column as isize);
        self.node(b, indent, owner)
    }

    /// Opens a block collection at `column` unless it is already the
    /// innermost one; `Some(column)` past the limit.
    fn open_block(&mut self, column: usize, sequence: bool) -> Option<usize> {
        if self.blocks.last() == Some(&(column, sequence)) {
            return None;
        }
        self.blocks.push((column, sequence));
        (self.depth() > MAX_NESTING_DEPTH).then_some(column)
    }

    /// Scans the nodes of a line from `at`, in block context; `owner` is the
    /// column of the collection entry they belong to (-1 at the top level).
    fn node(&mut self, b: &[u8], mut at: usize, mut owner: isize) -> Option<usize> {
        loop {
            // Anchors and tags.
            while at < b.len() && matches!(b[at], b'&' | b'!') {
                while at < b.len() && !matches!(b[at], b' ' | b'\t') {
                    at += 1;
                }
                at = skip_blanks(b, at);
            }
            if at >= b.len() || matches!(b[at], b'#' | b'\r') {
                return None;
            }
            match b[at] {
                // A sequence entry, or an explicit key or value.
                b'-' | b'?' | b':' if separates(b, at + 1) => {
                    if let Some(column) = self.open_block(at, b[at] == b'-') {
                        return Some(column);
                    }
                    owner = at as isize;
                    at = skip_blanks(b, at + 1);
                }
                b'[' | b'{' => return self.inline(b, at),
                b'|' | b'>' => {
                    self.block_scalar = Some(owner);
                    return None;
                }
                quote @ (b'"' | b'\'') => match quoted_end(b, at + 1, quote) {
                    None => {
                        self.quote = Some(quote);
                        return None;
                    }
                    Some(end) => {
                        let colon = skip_blanks(b, end);
                        if b.get(colon) != Some(&b':') || !separates(b, colon + 1) {
                            return None;
                        }
                        // A quoted key.
                        if let Some(column) = self.open_block(at, false) {
                            return Some(column);
                        }
                        owner = at as isize;
                        at = skip_blanks(b, colon + 1);
                    }
                },
                _ => {
                    // A plain scalar: a key if `: ` follows before any comment.
                    let mut colon = None;
                    for i in at..b.len() {
                        if b[i] == b':' && separates(b, i + 1) {
                            colon = Some(i);
                            break;
                        }
                        if b[i] == b'#' && matches!(b[i - 1], b' ' | b'\t') {
                            break;
                        }
                    }
                    let colon = colon?;
                    if let Some(column) = self.open_block(at, false) {
                        return Some(column);
                    }
                    owner = at as isize;
                    at = skip_blanks(b, colon + 1);
                }
            }
        }
    }

    /// Scans flow collections and quoted scalars from `b[i]` to the line's
    /// end, or until the outermost flow collection or a quoted block value
    /// closes.
    fn inline(&mut self, b: &[u8], mut i: usize) -> Option<usize> {
        while i < b.len() {
            if let Some(quote) = self.quote {
                let end = quoted_end(b, i, quote)?;
                self.quote = None;
                self.last = quote;
                if self.flow == 0 {
                    return None;
                }
                i = end;
                continue;
            }
            let c = b[i];
            match c {
                b'[' | b'{' => {
                    self.flow += 1;
                    if self.depth() > MAX_NESTING_DEPTH {
                        return Some(i);
                    }
                    self.last = c;
                }
                b']' | b'}' => {
                    self.flow = self.flow.saturating_sub(1);
                    self.last = c;
                    if self.flow == 0 {
                        return None;
                    }
                }
                b'#' if i == 0 || matches!(b[i - 1], b' ' | b'\t') => return None,
                b'"' | b'\'' if matches!(self.last, b'[' | b'{' | b',' | b':' | b'?') => {
                    self.quote = Some(c);
                }
                b' ' | b'\t' | b'\r' => {}
                _ => self.last = c,
            }
            i += 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::{MAX_NESTING_DEPTH as MAX, json, toml, yaml};

    #[test]
    fn json_counts_arrays_and_objects_outside_strings() {
        assert_eq!(json(&"[".repeat(MAX)), None);
        assert_eq!(json(&"[".repeat(MAX + 1)), Some(MAX));
        assert_eq!(
            json(&format!("{{\"a\": {}", "{\"b\": ".repeat(MAX))),
            Some(6 * MAX)
        );
        assert_eq!(
            json(&format!("[\"{}\\\"{}\"]", "[".repeat(99), "{".repeat(99))),
            None
        );
    }

    #[test]
    fn toml_counts_headers_dotted_keys_and_inline_values() {
        assert_eq!(toml(&format!("a = {}", "[".repeat(MAX - 1))), None);
        assert_eq!(toml(&format!("a = {}", "[".repeat(MAX))), Some(4 + MAX - 1));
        // `a.a = 1` opens one table: MAX - 1 dots reach the limit.
        let dotted = format!("a{} = 1", ".a".repeat(MAX - 1));
        assert_eq!(toml(&dotted), None);
        let dotted = format!("a{} = 1", ".a".repeat(MAX));
        assert_eq!(toml(&dotted), Some(dotted.len() - 3));
        let header = format!("[a{}]\nb = 1", ".a".repeat(MAX - 2));
        assert_eq!(toml(&header), None);
        let header = format!("[[a{}]]\nb = 1", ".a".repeat(MAX - 2));
        assert_eq!(toml(&header), Some(0));
        let inline = format!("a = {}", "{ b.c = ".repeat(MAX));
        assert!(toml(&inline).is_some());
        let strings = format!(
            "a = \"{0}\"\nb = '{0}'\nc = \"\"\"\n{0}\n\"\"\"\nd = '''{0}'''\n# {0}\n[x.\"{0}.y\"]\n",
            "[".repeat(200)
        );
        assert_eq!(toml(&strings), None);
    }

    #[test]
    fn yaml_counts_block_and_flow_collections() {
        // Flow: the document's mapping is level 1.
        assert_eq!(yaml(&format!("a: {}", "[".repeat(MAX - 1))), None);
        assert_eq!(yaml(&format!("a: {}", "[".repeat(MAX))), Some(3 + MAX - 1));
        // Block sequences on one line, and mappings by indentation.
        assert_eq!(yaml(&"- ".repeat(MAX)), None);
        assert_eq!(yaml(&"- ".repeat(MAX + 1)), Some(2 * MAX));
        let mut maps = String::new();
        for i in 0..MAX {
            maps.push_str(&format!("{}k:\n", "  ".repeat(i)));
        }
        assert_eq!(yaml(&maps), None);
        maps.push_str(&format!("{}k: 1\n", "  ".repeat(MAX)));
        assert!(yaml(&maps).is_some());
        // A sequence under a key at the key's column is a level of its own.
        // Each `- k:` line opens two levels: 1 + 2 * lines.
        let lines = (MAX - 1) / 2;
        let mut compact = "k:\n".to_owned();
        for i in 0..lines {
            compact.push_str(&format!("{}- k:\n", "  ".repeat(i)));
        }
        assert_eq!(yaml(&compact), None);
        compact.push_str(&format!("{}- k: 1\n", "  ".repeat(lines)));
        assert!(yaml(&compact).is_some());
        // Closed collections and siblings do not add up.
        let siblings = format!("{}\n", "a: [[1]]\nb:\n  - c: {d: 1}\n".repeat(500));
        assert_eq!(yaml(&siblings), None);
    }

    #[test]
    fn yaml_skips_strings_comments_and_block_scalars() {
        let deep = "[".repeat(200);
        let dashes = "- ".repeat(200);
        for text in [
            format!("a: \"{deep}\"\n"),
            format!("a: '{deep} it''s'\n"),
            format!("a: x{deep}\n"),
            format!("# {deep}\na: 1 # {deep}\n"),
            format!("a: |\n  {deep}\n  {dashes}\n\n  {deep}\nb: 1\n"),
            format!("- >-\n  {deep}\n- |\n {dashes}\n"),
            format!("a: \"x\n  {deep}\n  {dashes}\"\nb: 1\n"),
            format!("a: ['{deep}', \"{deep}\", x # {deep}\n  , \"]]\"]\n"),
            format!("--- |\n{deep}\n{dashes}\n"),
            format!("\"k: {deep}\": 1\n"),
        ] {
            assert_eq!(yaml(&text), None, "{text}");
        }
    }
}
