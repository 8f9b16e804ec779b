//! Programs that embed the cartridge runtime; see `examples/examples/`.
//!
//! - `corpus_kv`: turn the first `p` tokens of a text into a `.cart` (the KV of the text itself,
//!   which is how training initialises a cartridge by default), then answer a question with that
//!   cartridge in front and check it equals putting the text in the prompt.
