//! The README's table of settings is rendered from [`SETTINGS`]; this test fails when the
//! README's copy differs, and rewrites it when run with `KEEL_BLESS=1`.

use std::path::Path;

use super::SETTINGS;

const BEGIN: &str = "<!-- settings table: generated from crates/keel/src/config/settings.rs";
const END: &str = "<!-- end of the settings table -->";

/// Every setting: its environment variable, flag, default and doc line.
fn table() -> String {
    let mut out = String::from("| environment | flag | default | meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.default {
            "" => "none".to_owned(),
            d => format!("`{d}`"),
        };
        out.push_str(&format!(
            "| `{}` | `{}` | {default} | {} |\n",
            s.env,
            s.flag(),
            cell(&s.doc_line())
        ));
    }
    out
}

/// Text safe inside a Markdown table cell: `|` would end the cell, `<token>` would be taken
/// for HTML and vanish, and a `*` (`/debug/*`) could start emphasis.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
        .replace('<', "&lt;")
        .replace('*', "\\*")
}

/// `readme` with the text between the markers replaced by the table, or `None` when the
/// markers are missing.
fn with_table(readme: &str) -> Option<String> {
    let begin = readme.find(BEGIN)?;
    let table_start = begin + readme[begin..].find('\n')? + 1;
    let end = table_start + readme[table_start..].find(END)?;
    Some(format!(
        "{}{}{}",
        &readme[..table_start],
        table(),
        &readme[end..]
    ))
}

#[test]
fn the_readme_lists_every_setting_as_declared() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let readme = std::fs::read_to_string(&path).expect("README.md is readable");
    let updated = with_table(&readme).unwrap_or_else(|| {
        panic!("README.md lacks the settings table markers {BEGIN:?} … {END:?}")
    });
    if updated == readme {
        return;
    }
    if std::env::var_os("KEEL_BLESS").is_some() {
        std::fs::write(&path, updated).expect("README.md is writable");
        return;
    }
    panic!(
        "README.md's table of settings differs from the declarations in \
         crates/keel/src/config/settings.rs; regenerate it with\n  \
         KEEL_BLESS=1 cargo test -p keel --lib config::readme"
    );
}

#[test]
fn env_vars_are_the_names_in_capitals() {
    for s in SETTINGS {
        let expected = match s.name {
            // The seed's chaos switches keep the names the seed gave them.
            "slow_auth" | "db_failure" => s.name.to_ascii_uppercase(),
            name => format!("KEEL_{}", name.to_ascii_uppercase()),
        };
        assert_eq!(s.env, expected, "{}", s.name);
    }
}
