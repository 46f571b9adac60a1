//! The modules of rust/core/src depend on each other one way: op modules on the GPU launchers,
//! launchers on the driver, `cache::layout` on `cache::family`. This test reads the sources, turns
//! every `use` path and every `crate::` / `super::` path into an edge between modules (a module is
//! a file; a mod.rs is its folder; a parent merely declaring `mod child;` is no edge), and fails,
//! naming the cycle, if any two or more modules depend on each other.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

type Module = Vec<String>;

/// Every .rs file under `dir` with its module path (`lib.rs` is the root, `a/mod.rs` is `a`).
fn modules(dir: &Path, prefix: &Module, out: &mut BTreeMap<Module, String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let mut module = prefix.clone();
        if path.is_dir() {
            module.push(name);
            modules(&path, &module, out);
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        if !(name == "mod" || (prefix.is_empty() && name == "lib")) {
            module.push(name);
        }
        out.insert(module, fs::read_to_string(&path).unwrap());
    }
}

/// The code of a source file with comments, strings and character literals blanked out (so
/// that paths in doc links or messages are not read as dependencies), lengths unchanged.
fn code_only(src: &str) -> Vec<char> {
    let c: Vec<char> = src.chars().collect();
    let mut out = c.clone();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for x in &mut out[from..to.min(c.len())] {
            if *x != '\n' {
                *x = ' ';
            }
        }
    };
    let mut i = 0;
    while i < c.len() {
        let start = i;
        if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
            blank(&mut out, start, i);
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            i += 2;
            while i + 1 < c.len() && !(c[i] == '*' && c[i + 1] == '/') {
                i += 1;
            }
            i += 2;
            blank(&mut out, start, i);
        } else if c[i] == 'r' && (c.get(i + 1) == Some(&'"') || c.get(i + 1) == Some(&'#')) && !ident_char(&c, i.wrapping_sub(1)) {
            // Raw string r#"..."#: skip to the quote followed by as many hashes.
            let hashes = c[i + 1..].iter().take_while(|x| **x == '#').count();
            i += 1 + hashes;
            if c.get(i) != Some(&'"') {
                continue;
            }
            i += 1;
            while i < c.len() && !(c[i] == '"' && c[i + 1..].iter().take(hashes).filter(|x| **x == '#').count() == hashes) {
                i += 1;
            }
            i += 1 + hashes;
            blank(&mut out, start, i);
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            blank(&mut out, start, i);
        } else if c[i] == '\'' && (c.get(i + 1) == Some(&'\\') || c.get(i + 2) == Some(&'\'')) {
            // A character literal ('x' or '\n'); a lifetime ('a) has no closing quote.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
            blank(&mut out, start, i);
        } else {
            i += 1;
        }
    }
    out
}

fn ident_char(c: &[char], i: usize) -> bool {
    c.get(i).is_some_and(|x| x.is_alphanumeric() || *x == '_')
}

fn word_at(c: &[char], i: usize, word: &str) -> bool {
    let w: Vec<char> = word.chars().collect();
    c.get(i..i + w.len()) == Some(&w[..]) && !ident_char(c, i.wrapping_sub(1)) && !ident_char(c, i + w.len())
}

/// Tokens of a path or use tree: identifiers, `::`, `{`, `}`, `,`, `*`.
fn tokens(c: &[char]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if ident_char(c, i) {
            let start = i;
            while ident_char(c, i) {
                i += 1;
            }
            out.push(c[start..i].iter().collect());
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            if "{},*".contains(c[i]) {
                out.push(c[i].to_string());
            }
            i += 1;
        }
    }
    out
}

/// A path a `use` brings in, and the name it is bound to when renamed (`as name`).
type UsePath = (Vec<String>, Option<String>);

/// Expands a use tree starting at `t[i]` under `prefix` into full paths; returns the next index.
fn use_tree(t: &[String], mut i: usize, prefix: Vec<String>, out: &mut Vec<UsePath>) -> usize {
    let mut path = prefix;
    while i < t.len() {
        match t[i].as_str() {
            "{" => {
                i += 1;
                while i < t.len() && t[i] != "}" {
                    i = use_tree(t, i, path.clone(), out);
                    if t.get(i).map(String::as_str) == Some(",") {
                        i += 1;
                    }
                }
                return i + 1;
            }
            "*" => {
                out.push((path, None));
                return i + 1;
            }
            "::" => i += 1,
            "," | "}" => break,
            word => {
                if word == "as" {
                    out.push((path, t.get(i + 1).cloned()));
                    return i + 2;
                }
                path.push(word.to_string());
                i += 1;
                if t.get(i).map(String::as_str) != Some("::") {
                    break;
                }
            }
        }
    }
    out.push((path, None));
    i
}

/// Names of the inline modules (`mod name { ... }`) enclosing each position of `c`.
fn inline_modules(c: &[char]) -> Vec<Vec<String>> {
    let (mut at, mut open, mut depth) = (Vec::with_capacity(c.len()), Vec::<(String, usize)>::new(), 0usize);
    let mut pending: Option<String> = None;
    let mut i = 0;
    while i < c.len() {
        if word_at(c, i, "mod") {
            let rest: String = c[i + 3..].iter().collect();
            let name: String = rest.trim_start().chars().take_while(|x| x.is_alphanumeric() || *x == '_').collect();
            let after = rest.trim_start()[name.len()..].trim_start().chars().next();
            pending = (after == Some('{')).then_some(name);
        }
        match c[i] {
            '{' => {
                depth += 1;
                if let Some(name) = pending.take() {
                    open.push((name, depth));
                }
            }
            '}' => {
                if open.last().is_some_and(|(_, d)| *d == depth) {
                    open.pop();
                }
                depth -= 1;
            }
            _ => {}
        }
        at.push(open.iter().map(|(n, _)| n.clone()).collect());
        i += 1;
    }
    at
}

/// The module a path names from inside `here` (a file's module plus the inline modules around
/// the path): its longest prefix that is a file of the crate; `None` for other crates.
fn resolve(path: &[String], here: &Module, files: &BTreeMap<Module, String>) -> Option<Module> {
    let mut base = here.clone();
    let mut rest = path;
    match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
        }
        Some("self") => rest = &rest[1..],
        Some("super") => {
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        Some(first) => {
            let mut child = base.clone();
            child.push(first.to_string());
            if !files.contains_key(&child) {
                return None; // std, rayon, ...
            }
        }
        None => return None,
    }
    let mut module = base.clone();
    let mut best = files.contains_key(&module).then(|| module.clone());
    for seg in rest.iter().filter(|s| *s != "self") {
        module.push(seg.clone());
        if files.contains_key(&module) {
            best = Some(module.clone());
        }
    }
    // Inside an inline module, a path may stop at a virtual module: fall back to the file.
    best.or_else(|| (1..=base.len()).rev().map(|n| base[..n].to_vec()).find(|m| files.contains_key(m)))
}

/// For each module, the modules its paths name.
fn edges(files: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut graph: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (module, src) in files {
        let mut c = code_only(src);
        let inline = inline_modules(&c);
        let here = |i: usize| -> Module { module.iter().cloned().chain(inline[i].iter().cloned()).collect() };
        let mut paths: Vec<(usize, Vec<String>)> = Vec::new();
        // Names that `use` binds to modules (`use crate::gpu;` makes `gpu::quant::f` a path).
        let mut aliases: BTreeMap<String, Module> = BTreeMap::new();
        // `use` trees first; then blank them so that the scan below sees only paths in code.
        let mut i = 0;
        while i < c.len() {
            if word_at(&c, i, "use") {
                let end = (i..c.len()).find(|j| c[*j] == ';').expect("use ends with ;");
                let mut found = Vec::new();
                use_tree(&tokens(&c[i + 3..end]), 0, Vec::new(), &mut found);
                for (path, rename) in found {
                    let last = path.iter().rev().find(|s| *s != "self").cloned();
                    if let (Some(target), Some(last)) = (resolve(&path, &here(i), files), last) {
                        if target.last() == Some(&last) {
                            aliases.insert(rename.unwrap_or(last), target);
                        }
                    }
                    paths.push((i, path));
                }
                c[i..end].iter_mut().for_each(|x| *x = ' ');
                i = end;
            }
            i += 1;
        }
        // Paths in code: `crate::`, `super::`, `self::`, a child module or a name bound above.
        for i in 0..c.len() {
            if !ident_char(&c, i) || ident_char(&c, i.wrapping_sub(1)) || (i >= 1 && c[i - 1] == ':') {
                continue;
            }
            let end = (i..c.len()).find(|j| !(ident_char(&c, *j) || c[*j] == ':')).unwrap_or(c.len());
            let path: Vec<String> = tokens(&c[i..end]).into_iter().filter(|t| t != "::").collect();
            if path.len() < 2 {
                continue;
            }
            let path = match aliases.get(&path[0]) {
                // An alias stands for its module's absolute path.
                Some(m) => std::iter::once("crate".to_string()).chain(m.iter().cloned()).chain(path[1..].iter().cloned()).collect(),
                None => path,
            };
            paths.push((i, path));
        }
        for (at, path) in paths {
            if let Some(target) = resolve(&path, &here(at), files).filter(|t| t != module) {
                graph.entry(module.clone()).or_default().insert(target);
            }
        }
    }
    graph
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".to_string()
    } else {
        m.join("::")
    }
}

/// A cycle through `start`, if any: DFS back to it.
fn cycle_through(start: &Module, graph: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn dfs(
        node: &Module,
        start: &Module,
        graph: &BTreeMap<Module, BTreeSet<Module>>,
        seen: &mut BTreeSet<Module>,
        path: &mut Vec<Module>,
    ) -> bool {
        path.push(node.clone());
        for next in graph.get(node).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) && dfs(next, start, graph, seen, path) {
                return true;
            }
        }
        path.pop();
        false
    }
    let mut path = Vec::new();
    dfs(start, start, graph, &mut BTreeSet::new(), &mut path).then(|| {
        path.push(start.clone());
        path
    })
}

#[test]
fn modules_depend_on_each_other_one_way() {
    let mut files = BTreeMap::new();
    modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &Vec::new(), &mut files);
    let graph = edges(&files);
    assert!(graph.contains_key(&vec!["gpu".to_string(), "quant".to_string()]), "the parser sees the launchers' imports");
    let cycles: BTreeSet<String> = files
        .keys()
        .filter_map(|m| cycle_through(m, &graph))
        .map(|c| {
            // Rotate to start at the smallest module, so that one cycle is reported once.
            let ring = &c[..c.len() - 1];
            let first = (0..ring.len()).min_by_key(|i| &ring[*i]).unwrap();
            let names: Vec<String> = ring[first..].iter().chain(&ring[..=first]).map(name).collect();
            names.join(" -> ")
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles between modules of rust/core/src:\n  {}", cycles.into_iter().collect::<Vec<_>>().join("\n  "));
}
