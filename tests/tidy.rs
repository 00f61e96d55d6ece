//! Tidy checks on the source tree, std only: every file says what it is for (`//!`), the sink
//! encoders stay pure (ARCHITECTURE.md, invariant 4), the top-level modules depend on each
//! other without a cycle, and no file grows past a size a reader can hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The most lines a file may have before its first `#[cfg(test)]` module.
const MAX_LINES: usize = 800;

/// The files over [`MAX_LINES`] today, each waiting for its split. No file may join the list;
/// a file that is split leaves it (the test says so), so that it cannot grow back unnoticed.
const LONG_FILES: &[&str] = &[];

#[test]
fn every_source_file_opens_with_a_module_doc_comment() {
    let missing: Vec<String> = sources()
        .iter()
        .filter(|file| !file.text.starts_with("//!"))
        .map(|file| file.name.clone())
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not open with a `//!` line saying what they are for:\n  {}",
        missing.join("\n  ")
    );
}

/// The README opens with what botrelay is (its two commands follow), and none of its paragraphs
/// is there twice: an edit that went wrong once left one paragraph repeated thousands of times
/// in front of everything else, and nothing failed.
#[test]
fn the_readme_opens_with_what_botrelay_is_and_repeats_no_paragraph() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut lines = text.lines().filter(|line| !line.is_empty());
    assert_eq!(lines.next(), Some("# botrelay"), "the README's first line");
    assert!(
        lines
            .next()
            .is_some_and(|line| line.starts_with("botrelay is ")),
        "the README's first paragraph says what botrelay is"
    );
    let mut seen = BTreeSet::new();
    let mut repeated = BTreeSet::new();
    let mut in_code = false;
    for paragraph in text.split("\n\n") {
        // Code blocks may repeat a command; prose and headings may not.
        let fences = paragraph.matches("```").count();
        let prose = !in_code && fences == 0;
        if fences % 2 == 1 {
            in_code = !in_code;
        }
        let paragraph = paragraph.trim();
        if prose && paragraph.len() > 40 && !seen.insert(paragraph) {
            repeated.insert(paragraph.chars().take(80).collect::<String>());
        }
    }
    assert!(
        repeated.is_empty(),
        "README paragraphs found more than once:\n  {}",
        repeated.into_iter().collect::<Vec<_>>().join("\n  ")
    );
}

#[test]
fn sinks_know_neither_reqwest_nor_tokio() {
    let mut offences = Vec::new();
    for file in sources()
        .iter()
        .filter(|file| file.name.starts_with("src/sinks/"))
    {
        for (index, line) in file.text.lines().enumerate() {
            for word in ["reqwest", "tokio"] {
                if line.contains(word) {
                    offences.push(format!("{}:{}: {}", file.name, index + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offences.is_empty(),
        "the sink encoders are pure (no IO, no async): src/sinks/ must not mention reqwest or \
         tokio:\n  {}",
        offences.join("\n  ")
    );
}

#[test]
fn the_top_level_modules_import_each_other_without_a_cycle() {
    let edges = module_edges(&sources());
    let cycles: Vec<String> = strongly_connected_components(&edges)
        .into_iter()
        .filter(|component| component.len() > 1)
        .map(|component| describe_cycle(&component, &edges))
        .collect();
    assert!(
        cycles.is_empty(),
        "import cycles among the top-level modules of src (an edge a → b is a `crate::b` path \
         in a's files, outside `#[cfg(test)]` modules):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn no_source_file_is_longer_than_800_lines_before_its_tests() {
    let mut over = BTreeMap::new();
    for file in sources().iter().filter(|file| !file.test_only) {
        let lines = lines_before_tests(file);
        if lines > MAX_LINES {
            over.insert(file.name.clone(), lines);
        }
    }
    let new: Vec<String> = over
        .iter()
        .filter(|(name, _)| !LONG_FILES.contains(&name.as_str()))
        .map(|(name, lines)| format!("{name}: {lines} lines"))
        .collect();
    assert!(
        new.is_empty(),
        "files over {MAX_LINES} lines (before their `#[cfg(test)]` module): split them by \
         job:\n  {}",
        new.join("\n  ")
    );
    let done: Vec<&str> = LONG_FILES
        .iter()
        .copied()
        .filter(|name| !over.contains_key(*name))
        .collect();
    assert!(
        done.is_empty(),
        "no longer over {MAX_LINES} lines (or gone): remove from LONG_FILES in tests/tidy.rs: {}",
        done.join(", ")
    );
}

// ---------------------------------------------------------------------------------------------
// The source tree.

/// One `.rs` file under `src/`.
struct Source {
    /// Relative to the package, with `/`: `src/store/sqlite/queries.rs`.
    name: String,
    text: String,
    /// The text with comments and the contents of string and char literals blanked out (line
    /// breaks kept, so that offsets and line numbers stay those of `text`).
    code: String,
    /// The file of a module declared `#[cfg(test)] mod x;` (all of it is test code).
    test_only: bool,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut paths = Vec::new();
    collect_rs(&root.join("src"), &mut paths);
    paths.sort();
    let mut files: Vec<Source> = paths
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            let name = path
                .strip_prefix(root)
                .unwrap_or(path)
                .components()
                .map(|part| part.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            Source {
                name,
                code: blank_comments_and_literals(&text),
                text,
                test_only: false,
            }
        })
        .collect();
    // A module declared `#[cfg(test)] mod x;` in `dir/mod.rs` or `dir.rs` is `dir/x.rs` or
    // `dir/x/mod.rs`, and test code throughout.
    let mut test_files = BTreeSet::new();
    for file in &files {
        let dir = match file.name.strip_suffix(".rs") {
            Some(stem) if stem.ends_with("/mod") || stem == "src/lib" || stem == "src/main" => {
                stem.rsplit_once('/').map_or("", |(dir, _)| dir).to_owned()
            }
            Some(stem) => stem.to_owned(),
            None => continue,
        };
        for start in cfg_test_modules(&file.code) {
            if let Some((name, false)) = declared_module(&file.code[start..]) {
                test_files.insert(format!("{dir}/{name}.rs"));
                test_files.insert(format!("{dir}/{name}/mod.rs"));
            }
        }
    }
    for file in &mut files {
        file.test_only = test_files.contains(&file.name);
    }
    files
}

fn collect_rs(dir: &Path, paths: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_rs(&path, paths);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            paths.push(path);
        }
    }
}

/// `text` with every comment, and the contents of every string and char literal, replaced by
/// spaces (line breaks kept).
fn blank_comments_and_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_start(&chars, i) {
            // r"…", r#"…"#, br#"…"#: no escapes; ends at `"` and as many `#`.
            let open = chars[i..].iter().position(|&c| c == '"').unwrap_or(0) + 1;
            for &c in &chars[i..i + open] {
                out.push(c);
            }
            i += open;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    for &c in &chars[i..=i + hashes] {
                        out.push(c);
                    }
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, chars[i]);
                i += 1;
            }
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            if i < chars.len() {
                out.push('"');
                i += 1;
            }
        } else if c == '\'' && is_char_literal(&chars, i) {
            out.push('\'');
            i += 1;
            while i < chars.len() && chars[i] != '\'' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            if i < chars.len() {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// At a raw string literal (`r"`, `r#"`, `br"`…, not inside an identifier): its `#` count.
fn raw_string_start(chars: &[char], i: usize) -> Option<usize> {
    let before = i.checked_sub(1).map(|j| chars[j]);
    if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
        return None;
    }
    let mut j = i;
    if chars.get(j) == Some(&'b') || chars.get(j) == Some(&'c') {
        j += 1;
    }
    if chars.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let hashes = chars[j..].iter().take_while(|&&c| c == '#').count();
    (chars.get(j + hashes) == Some(&'"')).then_some(hashes)
}

/// A `'` that opens a char literal (`'a'`, `'\n'`, `'\u{1F600}'`), not a lifetime (`'a`).
fn is_char_literal(chars: &[char], i: usize) -> bool {
    match chars.get(i + 1) {
        Some('\\') => true,
        Some(_) => chars.get(i + 2) == Some(&'\''),
        None => false,
    }
}

/// The offsets in `code` of every `#[cfg(test)]` attribute that is on a module.
fn cfg_test_modules(code: &str) -> Vec<usize> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = code[from..].find("#[cfg(test)]") {
        let start = from + offset;
        if declared_module(&code[start..]).is_some() {
            found.push(start);
        }
        from = start + "#[cfg(test)]".len();
    }
    found
}

/// At `#[cfg(test)]`: the module it is on (`mod x {` → `("x", true)`, `mod x;` → `("x",
/// false)`), or `None` when it is on something else.
fn declared_module(at_attribute: &str) -> Option<(String, bool)> {
    let mut rest = at_attribute.strip_prefix("#[cfg(test)]")?.trim_start();
    // Further attributes on the same item.
    while rest.starts_with("#[") {
        let close = rest.find(']')?;
        rest = rest[close + 1..].trim_start();
    }
    for visibility in ["pub(crate)", "pub(super)", "pub"] {
        if let Some(after) = rest.strip_prefix(visibility) {
            rest = after.trim_start();
            break;
        }
    }
    let rest = rest.strip_prefix("mod")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim_start();
    let name: String = rest
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    match rest[name.len()..].trim_start().chars().next() {
        Some('{') => Some((name, true)),
        Some(';') => Some((name, false)),
        _ => None,
    }
}

/// The byte ranges of `code` inside `#[cfg(test)] mod x { … }` blocks.
fn test_blocks(code: &str) -> Vec<std::ops::Range<usize>> {
    let mut blocks = Vec::new();
    for start in cfg_test_modules(code) {
        if !declared_module(&code[start..]).is_some_and(|(_, inline)| inline) {
            continue;
        }
        let Some(open) = code[start..].find('{').map(|offset| start + offset) else {
            continue;
        };
        let mut depth = 0usize;
        let mut end = code.len();
        for (offset, c) in code[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + offset + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        blocks.push(start..end);
    }
    blocks
}

/// Lines before the first `#[cfg(test)] mod x { … }` (all of them when there is none).
fn lines_before_tests(file: &Source) -> usize {
    let first_test = cfg_test_modules(&file.code)
        .into_iter()
        .find(|&start| declared_module(&file.code[start..]).is_some_and(|(_, inline)| inline));
    match first_test {
        Some(start) => file.code[..start].lines().count(),
        None => file.text.lines().count(),
    }
}

// ---------------------------------------------------------------------------------------------
// The module graph.

/// Where an edge a → b was seen first: `file:line`.
type Edges = BTreeMap<String, BTreeMap<String, String>>;

/// The top-level module a file belongs to: `src/<name>.rs` or `src/<name>/…`. The crate
/// roots (`lib.rs`, `main.rs`) belong to none: they are not modules.
fn top_level_module(name: &str) -> Option<String> {
    let rest = name.strip_prefix("src/")?;
    match rest.split_once('/') {
        Some((dir, _)) => Some(dir.to_owned()),
        None if rest == "lib.rs" || rest == "main.rs" => None,
        None => rest.strip_suffix(".rs").map(str::to_owned),
    }
}

/// Every edge a → b among top-level modules: a `crate::b` path (also inside a
/// `crate::{b, c::…}` group) in a's code outside `#[cfg(test)]` modules.
fn module_edges(files: &[Source]) -> Edges {
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|file| top_level_module(&file.name))
        .collect();
    let mut edges: Edges = modules
        .iter()
        .map(|module| (module.clone(), BTreeMap::new()))
        .collect();
    for file in files.iter().filter(|file| !file.test_only) {
        let Some(from) = top_level_module(&file.name) else {
            continue;
        };
        let tests = test_blocks(&file.code);
        for (offset, target) in crate_paths(&file.code) {
            if tests.iter().any(|block| block.contains(&offset)) || target == from {
                continue;
            }
            if !modules.contains(&target) {
                continue;
            }
            let line = file.code[..offset].lines().count().max(1);
            edges
                .entry(from.clone())
                .or_default()
                .entry(target)
                .or_insert_with(|| format!("{}:{line}", file.name));
        }
    }
    edges
}

/// Each `crate::` path in `code`: its offset and the first segment after `crate::` (every
/// item's first segment for a `crate::{…}` group, nested groups included).
fn crate_paths(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = code[from..].find("crate::") {
        let start = from + offset;
        from = start + "crate::".len();
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `$crate::`, `mycrate::`
        }
        let rest = code[from..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            for name in group_heads(group) {
                found.push((start, name));
            }
        } else {
            found.push((start, identifier(rest)));
        }
    }
    found
}

/// The first segment of each item of a `{ a, b::c, d::{e, f} }` group (`group` starts after
/// the `{`).
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0usize;
    let mut item_start = true;
    for (offset, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && !c.is_whitespace() => {
                item_start = false;
                let name = identifier(&group[offset..]);
                if !name.is_empty() {
                    heads.push(name);
                }
            }
            _ => {}
        }
    }
    heads
}

fn identifier(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Tarjan's algorithm: the strongly connected components of `edges`.
fn strongly_connected_components(edges: &Edges) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a Edges,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<String>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let number = state.index.len();
        state.index.insert(node, number);
        state.low.insert(node, number);
        state.stack.push(node);
        state.on_stack.insert(node);
        let edges = state.edges;
        for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
            let next = next.as_str();
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member.to_owned());
                if member == node {
                    break;
                }
            }
            component.sort();
            state.components.push(component);
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for node in edges.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    state.components
}

/// A strongly connected component as one cycle through its first member (a shortest way back,
/// found breadth first), with where each edge comes from, and every edge inside it.
fn describe_cycle(component: &[String], edges: &Edges) -> String {
    let inside: BTreeSet<&str> = component.iter().map(String::as_str).collect();
    let start = component[0].as_str();
    // Breadth first from `start` back to `start`, inside the component.
    let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut closing = None;
    while let Some(node) = queue.pop_front() {
        for next in edges.get(node).into_iter().flat_map(BTreeMap::keys) {
            let next = next.as_str();
            if !inside.contains(next) {
                continue;
            }
            if next == start {
                closing = Some(node);
                break;
            }
            if !previous.contains_key(next) {
                previous.insert(next, node);
                queue.push_back(next);
            }
        }
        if closing.is_some() {
            break;
        }
    }
    let mut path = vec![start];
    if let Some(mut node) = closing {
        let mut back = vec![];
        while node != start {
            back.push(node);
            node = previous.get(node).copied().unwrap_or(start);
        }
        back.reverse();
        path.extend(back);
    }
    path.push(start);
    let steps: Vec<String> = path
        .windows(2)
        .map(|pair| {
            let seen = edges
                .get(pair[0])
                .and_then(|targets| targets.get(pair[1]))
                .map_or("?", String::as_str);
            format!("  {} → {}   ({seen})", pair[0], pair[1])
        })
        .collect();
    let mut all = Vec::new();
    for from in component {
        for (to, seen) in edges.get(from).into_iter().flatten() {
            if inside.contains(to.as_str()) {
                all.push(format!("    {from} → {to}   ({seen})"));
            }
        }
    }
    format!(
        "cycle among {{{}}}:\n{}\n  every edge inside it:\n{}",
        component.join(", "),
        steps.join("\n"),
        all.join("\n")
    )
}
