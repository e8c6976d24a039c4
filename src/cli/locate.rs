//! Where a field path is written in a config file's text, for `validate`'s
//! line numbers: exact for TOML and JSON, by indentation for YAML (see
//! "`validate`'s line numbers" in the [`cli`](super) module documentation).

use super::ConfigFormat;

/// One step of a field path: a key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `a.b[2].c` as `[Key(a), Key(b), Index(2), Key(c)]`.
fn segments(path: &str) -> Vec<Segment> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key.to_owned()));
        }
        while let Some(inner) = rest.strip_prefix('[') {
            let Some(end) = inner.find(']') else { break };
            match inner[..end].parse() {
                Ok(i) => out.push(Segment::Index(i)),
                Err(_) => return out,
            }
            rest = &inner[end + 1..];
        }
    }
    out
}

/// Where `path` is written in `text`: line and column (from 1) of its key,
/// or of the closest parent that is written. See the module documentation
/// for how exact each format is.
pub(super) fn locate(text: &str, format: ConfigFormat, path: &str) -> Option<(usize, usize)> {
    let segments = segments(path);
    if segments.is_empty() {
        return None;
    }
    match format {
        ConfigFormat::Toml => toml_offset(text, &segments).map(|o| line_column(text, o)),
        ConfigFormat::Json => json_offset(text, &segments).map(|o| line_column(text, o)),
        ConfigFormat::Yaml => yaml_position(text, &segments),
    }
}

/// Line and column (from 1; the column in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// The byte offset of the deepest written step of `segments` in a TOML
/// document, from the `toml` crate's spanned parse.
fn toml_offset(text: &str, segments: &[Segment]) -> Option<usize> {
    use toml::de::{DeTable, DeValue};

    let root = DeTable::parse(text).ok()?;
    let mut best = None;
    let mut current: Option<&toml::Spanned<DeValue<'_>>> = None;
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                let table = match current {
                    None => root.get_ref(),
                    Some(value) => match value.get_ref() {
                        DeValue::Table(table) => table,
                        _ => break,
                    },
                };
                let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
                    break;
                };
                best = Some(k.span().start);
                current = Some(v);
            }
            Segment::Index(i) => {
                let Some(DeValue::Array(items)) = current.map(toml::Spanned::get_ref) else {
                    break;
                };
                let Some(item) = items.get(*i) else { break };
                best = Some(item.span().start);
                current = Some(item);
            }
        }
    }
    best
}

/// A forward-only scanner over JSON text that finds where keys are written.
struct JsonScanner<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl JsonScanner<'_> {
    fn skip_whitespace(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_whitespace();
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string token (the scanner at its opening quote), decoded.
    fn string(&mut self) -> Option<String> {
        self.skip_whitespace();
        if self.peek()? != b'"' {
            return None;
        }
        self.at += 1;
        let start = self.at;
        let mut escaped = false;
        loop {
            let b = self.peek()?;
            self.at += 1;
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => break,
                _ => {}
            }
        }
        let raw = std::str::from_utf8(&self.bytes[start - 1..self.at]).ok()?;
        serde_json::from_str(raw).ok()
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        self.skip_whitespace();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                while self
                    .peek()
                    .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                {
                    self.at += 1;
                }
                Some(())
            }
        }
    }
}

/// The byte offset of the deepest written step of `segments` in a JSON
/// document: the key's opening quote, or an array element's first byte.
fn json_offset(text: &str, segments: &[Segment]) -> Option<usize> {
    let mut s = JsonScanner {
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut best = None;
    'path: for segment in segments {
        match segment {
            Segment::Key(key) => {
                if s.expect(b'{').is_none() {
                    break;
                }
                loop {
                    s.skip_whitespace();
                    if s.peek() == Some(b'}') {
                        break 'path;
                    }
                    let start = s.at;
                    let Some(name) = s.string() else {
                        break 'path;
                    };
                    if s.expect(b':').is_none() {
                        break 'path;
                    }
                    if name == *key {
                        best = Some(start);
                        continue 'path;
                    }
                    if s.skip_value().is_none() {
                        break 'path;
                    }
                    if s.expect(b',').is_none() {
                        break 'path;
                    }
                }
            }
            Segment::Index(i) => {
                if s.expect(b'[').is_none() {
                    break;
                }
                for _ in 0..*i {
                    if s.skip_value().is_none() || s.expect(b',').is_none() {
                        break 'path;
                    }
                }
                s.skip_whitespace();
                if matches!(s.peek(), None | Some(b']')) {
                    break;
                }
                best = Some(s.at);
            }
        }
    }
    best
}

/// One line of a YAML document, as the indentation scanner sees it.
struct YamlLine<'a> {
    /// Spaces before the first character.
    indent: usize,
    /// Indent of the first key on the line: past any `- ` sequence markers.
    key_indent: usize,
    /// The text at `key_indent`.
    content: &'a str,
    /// Whether the line starts a sequence item (`- ...`).
    item: bool,
}

fn yaml_line(line: &str) -> Option<YamlLine<'_>> {
    let trimmed = line.trim_start_matches(' ');
    if trimmed.trim().is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
        return None;
    }
    let indent = line.len() - trimmed.len();
    let mut key_indent = indent;
    let mut content = trimmed;
    let item = content == "-" || content.starts_with("- ");
    while content == "-" || content.starts_with("- ") {
        let after = content[1..].trim_start_matches(' ');
        key_indent += content.len() - after.len();
        content = after;
    }
    Some(YamlLine {
        indent,
        key_indent,
        content,
        item,
    })
}

/// Whether `content` is the mapping key `key` (plain or quoted) followed by `:`.
fn yaml_key_is(content: &str, key: &str) -> bool {
    [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
        .iter()
        .any(|k| {
            content.strip_prefix(k.as_str()).is_some_and(|rest| {
                rest == ":" || rest.starts_with(": ") || rest.starts_with(":\t")
            })
        })
}

/// Line and column of the deepest written step of `segments` in a YAML
/// document, followed by indentation (block style only; best effort).
fn yaml_position(text: &str, segments: &[Segment]) -> Option<(usize, usize)> {
    let lines: Vec<Option<YamlLine<'_>>> = text.lines().map(yaml_line).collect();
    // The block being searched: lines [start, end) whose keys are indented
    // more than `parent` (`None` at the top level).
    let (mut start, mut end) = (0, lines.len());
    let mut parent: Option<usize> = None;
    let mut best = None;
    for segment in segments {
        let deeper = |indent: usize| parent.is_none_or(|p| indent > p);
        match segment {
            Segment::Key(key) => {
                let block = (start..end)
                    .filter_map(|i| lines[i].as_ref())
                    .map(|l| l.key_indent)
                    .filter(|&k| deeper(k))
                    .min();
                let Some(level) = block else { break };
                let found = (start..end).find(|&i| {
                    lines[i]
                        .as_ref()
                        .is_some_and(|l| l.key_indent == level && yaml_key_is(l.content, key))
                });
                let Some(at) = found else { break };
                best = Some((at + 1, level + 1));
                // Its children: the lines after it indented more, or `- `
                // items at its own indent (an indentless sequence).
                let next = (at + 1..end)
                    .find(|&i| {
                        lines[i]
                            .as_ref()
                            .is_some_and(|l| l.indent < level || (l.indent == level && !l.item))
                    })
                    .unwrap_or(end);
                (start, end) = (at + 1, next);
                parent = Some(level);
            }
            Segment::Index(index) => {
                let items: Vec<usize> = (start..end)
                    .filter(|&i| lines[i].as_ref().is_some_and(|l| l.item))
                    .collect();
                let Some(level) = items
                    .iter()
                    .map(|&i| lines[i].as_ref().map(|l| l.indent))
                    .min()
                else {
                    break;
                };
                let items: Vec<usize> = items
                    .into_iter()
                    .filter(|&i| lines[i].as_ref().map(|l| l.indent) == level)
                    .collect();
                let Some(&at) = items.get(*index) else { break };
                let level = level.unwrap_or(0);
                best = Some((at + 1, level + 1));
                let next = items.get(index + 1).copied().unwrap_or(end);
                (start, end) = (at, next);
                parent = Some(level);
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(path: &str) -> Vec<Segment> {
        segments(path)
    }

    #[test]
    fn paths_split_into_keys_and_indices() {
        use Segment::{Index, Key};
        assert_eq!(
            seg("processors[2].name"),
            [Key("processors".into()), Index(2), Key("name".into())]
        );
        assert_eq!(seg("latency_target"), [Key("latency_target".into())]);
        assert_eq!(
            seg("a.b[0][1]"),
            [Key("a".into()), Key("b".into()), Index(0), Index(1)]
        );
    }

    const TOML: &str = "provider = \"local\"\n\
        pipeline_type = \"s2s\"\n\
        s2s_provider = \"echo\"\n\
        latency_target = \"50ms\"\n\
        \n\
        [[processors]]\n\
        name = \"a\"\n\
        \n\
        [[processors]]\n\
        name = \"b\"\n\
        \n\
        [components.silence]\n\
        min_speech = \"9s\"\n";

    #[test]
    fn toml_keys_are_located() {
        let at = |p| locate(TOML, ConfigFormat::Toml, p);
        assert_eq!(at("latency_target"), Some((4, 1)));
        assert_eq!(at("processors[1].name"), Some((10, 1)));
        assert_eq!(at("components.silence.min_speech"), Some((13, 1)));
        // Missing: the closest written parent, or nothing.
        assert_eq!(at("components.silence.nope"), at("components.silence"));
        assert_eq!(at("stt_provider"), None);
    }

    const JSON: &str = r#"{
  "provider": "local",
  "latency_target": "50ms",
  "processors": [
    {"name": "a"},
    {"name": "b", "options": {"x": [1, {"y": "}"}]}}
  ],
  "components": {"silence": {"min_speech": "9s"}}
}"#;

    #[test]
    fn json_keys_are_located() {
        let at = |p| locate(JSON, ConfigFormat::Json, p);
        assert_eq!(at("latency_target"), Some((3, 3)));
        assert_eq!(at("processors[1].name"), Some((6, 6)));
        assert_eq!(at("processors[1].options.x[1].y"), Some((6, 41)));
        assert_eq!(at("components.silence.min_speech"), Some((8, 30)));
        assert_eq!(at("nope"), None);
    }

    const YAML: &str = "provider: local\n\
        # a comment\n\
        latency_target: 50ms\n\
        processors:\n\
        - name: a\n\
        - name: b\n\
        \x20 options:\n\
        \x20   level: 3\n\
        components:\n\
        \x20 silence:\n\
        \x20   min_speech: 9s\n\
        \x20 energy:\n\
        \x20   threshold_db: 1\n";

    #[test]
    fn yaml_keys_are_located() {
        let at = |p| locate(YAML, ConfigFormat::Yaml, p);
        assert_eq!(at("latency_target"), Some((3, 1)));
        assert_eq!(at("processors[0].name"), Some((5, 3)));
        assert_eq!(at("processors[1].name"), Some((6, 3)));
        assert_eq!(at("processors[1].options.level"), Some((8, 5)));
        assert_eq!(at("components.silence.min_speech"), Some((11, 5)));
        assert_eq!(at("components.energy.threshold_db"), Some((13, 5)));
        assert_eq!(at("components.energy.nope"), Some((12, 3)));
        assert_eq!(at("stt_provider"), None);
    }
}
