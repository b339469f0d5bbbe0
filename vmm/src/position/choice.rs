//! What a run asks of the position counter (`--position`, `[ft] position`):
//! plain data, imported by the recording options without the counter.

/// What `--position` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionChoice {
    /// The best counter that passes its self-check, else none.
    Auto,
    /// `insn_emulation`; refused if its self-check fails.
    KvmInsnStat,
    /// No counter.
    None,
}
