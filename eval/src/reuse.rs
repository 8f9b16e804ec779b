//! Reusing the reference modes of an earlier `--json` report instead of measuring them again.
//!
//! On a CPU the in-context mode takes most of an evaluation (the whole corpus prefilled, then a
//! long prefix behind every generated token), and its answers do not change while cartridges are
//! retrained. The reference modes (bare model, ICL, ICL cut to a budget) depend only on the model,
//! the questions and conversations, the generation settings and, for ICL, the system message: a
//! report records each, and a mode is reused only where all of them match.

use std::path::Path;

use crate::error::{Error, Result};
use crate::mode::ModeKind;
use crate::report::{ModeReport, Report};

/// Modes whose results depend on nothing but what [`Report`] records (the model, its data digest
/// and its ICL context).
pub fn is_reference(kind: ModeKind) -> bool {
    matches!(
        kind,
        ModeKind::Bare | ModeKind::Icl | ModeKind::IclTruncated
    )
}

/// The digest a report records for its in-context modes' system message.
pub fn icl_context_digest(system_message: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("sha256:{:x}", Sha256::digest(system_message.as_bytes()))
}

/// Read a report that `cartridge eval --json` wrote.
pub fn read_report(path: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Reuse {
        path: path.to_path_buf(),
        message: format!("not a report from `cartridge eval --json` ({e})"),
    })
}

/// The reference modes of `earlier` (read from `path`) that a run on `model` measuring
/// `data_digest` can take instead of measuring them. `icl_context` is this run's ICL system
/// message digest, when it has the corpus: the earlier ICL modes must have been measured with the
/// same one.
pub fn reusable_modes(
    earlier: &Report,
    path: &Path,
    model: &str,
    data_digest: &str,
    icl_context: Option<&str>,
) -> Result<Vec<ModeReport>> {
    let refuse = |message: String| Error::Reuse {
        path: path.to_path_buf(),
        message,
    };
    if earlier.model != model {
        return Err(refuse(format!(
            "it was measured on model {}, this run uses {model}",
            earlier.model
        )));
    }
    if earlier.data_digest.is_empty() {
        return Err(refuse(
            "it does not record what it was measured on (written before reports carried a data \
             digest): evaluate its modes again"
                .into(),
        ));
    }
    if earlier.data_digest != data_digest {
        return Err(refuse(
            "it was measured on other questions, conversations or generation settings \
             (--data, --limit, --generate, --max-tokens, --held-out)"
                .into(),
        ));
    }
    let modes: Vec<ModeReport> = earlier
        .modes
        .iter()
        .filter(|m| is_reference(m.kind) && m.skipped.is_none())
        .cloned()
        .collect();
    let has_icl = modes.iter().any(|m| m.kind != ModeKind::Bare);
    if let (true, Some(ours)) = (has_icl, icl_context) {
        if earlier.icl_context.as_deref() != Some(ours) {
            return Err(refuse(
                "its in-context modes had another corpus or description in the system message"
                    .into(),
            ));
        }
    }
    if modes.is_empty() {
        return Err(refuse("it has no evaluated bare or in-context mode".into()));
    }
    Ok(modes)
}

impl Report {
    /// Add `earlier`'s modes (from [`reusable_modes`]) that this report does not have (by name and
    /// kind), marked as taken from `source`, put the reference modes first (bare, ICL, ICL cut)
    /// and derive the gap figures and the comparisons with ICL again. `icl_context` is the earlier
    /// report's.
    pub fn adopt(&mut self, earlier: Vec<ModeReport>, source: &str, icl_context: Option<String>) {
        let mut taken = Vec::new();
        for mut m in earlier {
            if self
                .modes
                .iter()
                .any(|o| o.name == m.name && o.kind == m.kind)
            {
                continue;
            }
            taken.push(m.name.clone());
            m.reused_from = Some(source.to_string());
            if m.kind != ModeKind::Bare && self.icl_context.is_none() {
                self.icl_context.clone_from(&icl_context);
            }
            self.modes.push(m);
        }
        if taken.is_empty() {
            return;
        }
        // Stable: the modes measured here keep the order they were asked in.
        self.modes.sort_by_key(|m| match m.kind {
            ModeKind::Bare => 0,
            ModeKind::Icl => 1,
            ModeKind::IclTruncated => 2,
            _ => 3,
        });
        self.compute_gaps();
        self.compare_with_icl();
        self.notes.push(format!(
            "{} measured earlier, taken from {source}",
            taken.join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cartridge_named_like_a_reference_mode_does_not_hide_it() {
        let mut report = Report {
            model: "m".into(),
            qa_items: 0,
            conversations: 0,
            data_digest: "d".into(),
            icl_context: None,
            modes: vec![ModeReport::new("icl".into(), ModeKind::Cartridges, 4, 0)],
            notes: vec![],
        };
        let earlier = vec![
            ModeReport::new("bare".into(), ModeKind::Bare, 0, 0),
            ModeReport::new("icl".into(), ModeKind::Icl, 9, 0),
        ];
        report.adopt(earlier, "e.json", Some("c".into()));
        let kinds: Vec<(&str, ModeKind, bool)> = report
            .modes
            .iter()
            .map(|m| (m.name.as_str(), m.kind, m.reused_from.is_some()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("bare", ModeKind::Bare, true),
                ("icl", ModeKind::Icl, true),
                ("icl", ModeKind::Cartridges, false)
            ]
        );
        assert_eq!(report.icl_context.as_deref(), Some("c"));
        assert_eq!(
            report.notes,
            ["bare, icl measured earlier, taken from e.json"]
        );
    }
}
