//! `--config F.toml`: a settings file whose keys are the command's own long flags
//! (`num = 64`, `max-steps = 200` or `max_steps = 200`, `json = true`), so the file mirrors every
//! flag by construction and needs no second schema to keep in sync.
//!
//! Before clap parses, the file's settings are turned into flags and inserted right after the
//! subcommand name; every flag may repeat and the last occurrence wins, so what is typed on the
//! command line overrides the file. List settings (`cartridge = ["a.cart", "b.cart"]`) become
//! repeated flags, added to any given on the command line. Positional arguments (the corpus)
//! stay on the command line.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;

/// `--config FILE.toml`, flattened into the commands that take one. Its value is consumed by
/// [`expand`] before clap parses; the field exists so clap accepts and documents the flag.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// Settings from a TOML file whose keys are this command's long flags (`num = 64`,
    /// `max-steps = 200`, `json = true`, `cartridge = ["a.cart"]`); flags on the command line
    /// override it.
    #[arg(long, value_name = "FILE.toml")]
    #[allow(dead_code)]
    pub config: Option<std::path::PathBuf>,
}

/// `argv` with the settings of its `--config` file (if any) expanded in place.
pub fn expand<C: CommandFactory>(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(sub) = argv.get(1).and_then(|s| s.to_str()).map(str::to_string) else {
        return Ok(argv);
    };
    let Some(path) = config_path(&argv[2..]) else {
        return Ok(argv);
    };
    let command = C::command();
    let Some(subcommand) = command.find_subcommand(&sub) else {
        return Ok(argv);
    };
    let flags: Vec<(String, bool)> = subcommand
        .get_arguments()
        .filter_map(|a| {
            let takes_value = a.get_action().takes_values();
            a.get_long().map(|l| (l.to_string(), takes_value))
        })
        .collect();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let settings = flags_of(&text, &flags, &path, &sub)?;
    let mut out = argv[..2].to_vec();
    out.extend(settings.into_iter().map(OsString::from));
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

/// The value of `--config PATH` / `--config=PATH` (before a `--`).
fn config_path(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return None;
        }
        if s == "--config" {
            return it.next().map(Into::into);
        }
        if let Some(p) = s.strip_prefix("--config=") {
            return Some(p.into());
        }
    }
    None
}

/// The flags a TOML text stands for. `flags` are the command's long names with whether each
/// takes a value.
fn flags_of(
    text: &str,
    flags: &[(String, bool)],
    path: &Path,
    command: &str,
) -> Result<Vec<String>> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        let name = key.replace('_', "-");
        let known = flags
            .iter()
            .find(|(long, _)| *long == name && long != "config" && long != "help");
        let Some((_, takes_value)) = known else {
            bail!(
                "{}: `{key}` is not a setting of `cartridge {command}` (settings are its long \
                 flags; see `cartridge {command} --help`)",
                path.display()
            );
        };
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{}: `{key}` {what} (for example `{key} = {}`)",
                path.display(),
                if *takes_value { "\"...\"" } else { "true" }
            )
        };
        match value {
            toml::Value::Boolean(on) if !takes_value => {
                if *on {
                    out.push(format!("--{name}"));
                }
            }
            toml::Value::Boolean(_) => return Err(bad("takes a value, not true/false")),
            _ if !takes_value => return Err(bad("is a switch: give true or false")),
            toml::Value::Array(items) => {
                for item in items {
                    out.push(format!(
                        "--{name}={}",
                        scalar(item).ok_or_else(|| bad("holds a list of plain values"))?
                    ));
                }
            }
            v => out.push(format!(
                "--{name}={}",
                scalar(v).ok_or_else(|| bad("must be a string or a number"))?
            )),
        }
    }
    Ok(out)
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::Parser;

    fn argv(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn write(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p.to_string_lossy().into_owned())
    }

    #[test]
    fn file_settings_become_flags_and_the_command_line_wins() {
        let (_d, p) = write("num = 7\nmax_steps = 3\nlr = 0.05\njson = true\nresume = false\n");
        let args = expand::<Cli>(argv(&[
            "cartridge",
            "build",
            "corpus",
            "--config",
            &p,
            "--num",
            "9",
        ]))
        .unwrap();
        let parsed = format!("{:?}", Cli::try_parse_from(&args).unwrap());
        assert!(parsed.contains("num: 9"), "{parsed}");
        assert!(parsed.contains("max_steps: Some(3)"), "{parsed}");
        assert!(parsed.contains("lr: 0.05"), "{parsed}");
        assert!(
            parsed.contains("json: true") && parsed.contains("resume: false"),
            "{parsed}"
        );
        // Without the override the file's value holds.
        let args = expand::<Cli>(argv(&[
            "cartridge",
            "build",
            "corpus",
            &format!("--config={p}"),
        ]))
        .unwrap();
        let parsed = format!("{:?}", Cli::try_parse_from(&args).unwrap());
        assert!(parsed.contains("num: 7"), "{parsed}");
    }

    #[test]
    fn unknown_or_mistyped_settings_are_refused_with_the_file_name() {
        for (text, needle) in [
            ("nmu = 3", "`nmu` is not a setting of `cartridge build`"),
            ("json = \"yes\"", "is a switch"),
            ("num = true", "takes a value"),
            ("num = {a = 1}", "must be a string or a number"),
            ("num = ", "not valid TOML"),
            ("config = \"x.toml\"", "is not a setting"),
        ] {
            let (_d, p) = write(text);
            let err =
                expand::<Cli>(argv(&["cartridge", "build", "c", "--config", &p])).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains(needle) && msg.contains("c.toml"),
                "{text}: {msg}"
            );
        }
        let err = expand::<Cli>(argv(&[
            "cartridge",
            "build",
            "c",
            "--config",
            "/nonexistent.toml",
        ]))
        .unwrap_err();
        assert!(format!("{err:#}").contains("cannot read the config file"));
    }

    #[test]
    fn without_config_argv_is_untouched() {
        let a = argv(&["cartridge", "build", "c", "--num", "3"]);
        assert_eq!(expand::<Cli>(a.clone()).unwrap(), a);
    }
}
