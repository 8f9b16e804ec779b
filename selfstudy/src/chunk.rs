//! Token chunking: the corpus tokenised file by file, and random windows of `min..=max` tokens
//! drawn uniformly over the concatenation of the files. A window that crosses a file boundary
//! keeps the boundary: it becomes one piece per file, each shown under its path.

use cartridge_formats::dataset::{ChunkLocation, ChunkPiece};
use rand::Rng;

use crate::backend::Backend;
use crate::corpus::Corpus;
use crate::error::{Error, Result};

/// One tokenised file.
#[derive(Debug, Clone)]
pub struct TokenizedFile {
    /// Relative path.
    pub path: String,
    /// Its token ids.
    pub tokens: Vec<u32>,
}

/// The corpus as tokens, files in path order.
#[derive(Debug, Clone)]
pub struct TokenizedCorpus {
    /// Files with at least one token.
    pub files: Vec<TokenizedFile>,
    /// Cumulative token offsets: file `i` spans `starts[i]..starts[i + 1]`.
    starts: Vec<u64>,
}

impl TokenizedCorpus {
    /// Tokenise every file with the backend's tokenizer.
    pub fn new(corpus: &Corpus, backend: &dyn Backend) -> Result<Self> {
        let mut files = Vec::with_capacity(corpus.files.len());
        for f in &corpus.files {
            let tokens = backend.encode(&f.text)?;
            if !tokens.is_empty() {
                files.push(TokenizedFile {
                    path: f.path.clone(),
                    tokens,
                });
            }
        }
        Self::from_files(files)
    }

    /// From already tokenised files.
    pub fn from_files(files: Vec<TokenizedFile>) -> Result<Self> {
        let mut starts = vec![0u64];
        for f in &files {
            let last = starts.last().copied().unwrap_or(0);
            starts.push(last + f.tokens.len() as u64);
        }
        if starts.last().copied().unwrap_or(0) == 0 {
            return Err(Error::Config("the corpus has no tokens".into()));
        }
        Ok(Self { files, starts })
    }

    /// Total tokens.
    pub fn total(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// The pieces covering global tokens `start..start + len`.
    fn pieces(&self, start: u64, len: u64) -> Vec<ChunkPiece> {
        let end = (start + len).min(self.total());
        let mut out = Vec::new();
        for (i, f) in self.files.iter().enumerate() {
            let (fs, fe) = (self.starts[i], self.starts[i + 1]);
            if fe <= start || fs >= end {
                continue;
            }
            out.push(ChunkPiece {
                file: f.path.clone(),
                start: start.max(fs) - fs,
                end: end.min(fe) - fs,
            });
        }
        out
    }

    /// The text shown to the teacher for `location`: each piece under a `### path` line (a
    /// directory corpus keeps its file names). Token ranges are decoded with the backend, so a
    /// range that splits a character shows U+FFFD at its edge.
    pub fn chunk_text(&self, location: &ChunkLocation, backend: &dyn Backend) -> Result<String> {
        self.chunk_text_with(location, |ids| backend.decode(ids))
    }

    /// The text of `location`'s first piece alone, without a file header: a quote from one file.
    /// Also says whether that piece starts at its file's beginning (so its first word is whole).
    pub fn first_piece_text(
        &self,
        location: &ChunkLocation,
        backend: &dyn Backend,
    ) -> Result<(String, bool)> {
        match location.pieces.first() {
            Some(p) => Ok((backend.decode(self.piece_tokens(p)?)?, p.start == 0)),
            None => Ok((String::new(), true)),
        }
    }

    /// The token ids of one piece of a chunk.
    fn piece_tokens(&self, p: &ChunkPiece) -> Result<&[u32]> {
        let f = self
            .files
            .iter()
            .find(|f| f.path == p.file)
            .ok_or_else(|| Error::Config(format!("chunk names unknown file {}", p.file)))?;
        f.tokens
            .get(p.start as usize..p.end as usize)
            .ok_or_else(|| Error::Config(format!("chunk range out of {}", p.file)))
    }

    /// [`Self::chunk_text`] with any decoder of token ids (an evaluation rebuilding the teacher's
    /// system message has a tokenizer but no generating backend).
    pub fn chunk_text_with(
        &self,
        location: &ChunkLocation,
        decode: impl Fn(&[u32]) -> Result<String>,
    ) -> Result<String> {
        let mut text = String::new();
        let show_paths = self.files.len() > 1;
        for p in &location.pieces {
            let toks = self.piece_tokens(p)?;
            if show_paths {
                if !text.is_empty() {
                    text.push_str("\n\n");
                }
                text.push_str(&format!("### {}\n", p.file));
            }
            text.push_str(&decode(toks)?);
        }
        Ok(text)
    }
}

/// Window sizes, already clipped to what the model's window allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSizes {
    /// Smallest window.
    pub min: usize,
    /// Largest window.
    pub max: usize,
}

impl ChunkSizes {
    /// Clip `min..=max` so that a chunk plus `room` tokens of conversation fits `window`.
    pub fn clipped(min: usize, max: usize, window: usize, room: usize) -> Result<Self> {
        if min == 0 || min > max {
            return Err(Error::Config(format!(
                "chunk sizes {min}..{max}: need 1 <= min <= max"
            )));
        }
        let budget = window.saturating_sub(room);
        if budget < 16 {
            return Err(Error::Config(format!(
                "the model's window of {window} tokens leaves no room for a chunk after {room} \
                 tokens of conversation; lower the message lengths"
            )));
        }
        let max = max.min(budget);
        Ok(Self {
            min: min.min(max),
            max,
        })
    }
}

/// Draw one window: a length uniform in `min..=max` (at most the corpus), then a start uniform
/// over every position where it fits.
pub fn draw_chunk(
    corpus: &TokenizedCorpus,
    sizes: ChunkSizes,
    chunk: u64,
    rng: &mut impl Rng,
) -> ChunkLocation {
    let total = corpus.total();
    let len = (rng.random_range(sizes.min..=sizes.max) as u64).min(total);
    let start = rng.random_range(0..=total - len);
    ChunkLocation {
        chunk,
        pieces: corpus.pieces(start, len),
    }
}

/// The passage of `location` covering its tokens `offset..offset + len`, counted over its pieces
/// in order (clipped to the location's end).
pub fn passage(location: &ChunkLocation, offset: u64, len: u64) -> ChunkLocation {
    let mut pieces = Vec::new();
    let (mut skip, mut want) = (offset, len);
    for p in &location.pieces {
        let n = p.end - p.start;
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(want);
        if take == 0 {
            break;
        }
        pieces.push(ChunkPiece {
            file: p.file.clone(),
            start: p.start + skip,
            end: p.start + skip + take,
        });
        skip = 0;
        want -= take;
    }
    ChunkLocation {
        chunk: location.chunk,
        pieces,
    }
}

/// Tokens in `location`.
pub fn location_tokens(location: &ChunkLocation) -> u64 {
    location.pieces.iter().map(|p| p.end - p.start).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn corpus() -> TokenizedCorpus {
        TokenizedCorpus::from_files(vec![
            TokenizedFile {
                path: "a".into(),
                tokens: (0..100).collect(),
            },
            TokenizedFile {
                path: "b".into(),
                tokens: (0..50).collect(),
            },
        ])
        .expect("corpus")
    }

    #[test]
    fn windows_stay_in_bounds_and_split_at_files() {
        let c = corpus();
        let sizes = ChunkSizes { min: 20, max: 60 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut crossed = false;
        for i in 0..500 {
            let loc = draw_chunk(&c, sizes, i, &mut rng);
            let len: u64 = loc.pieces.iter().map(|p| p.end - p.start).sum();
            assert!((20..=60).contains(&len), "{len}");
            for p in &loc.pieces {
                let n = if p.file == "a" { 100 } else { 50 };
                assert!(p.start < p.end && p.end <= n);
            }
            crossed |= loc.pieces.len() == 2;
        }
        assert!(crossed, "some windows cross the file boundary");
    }

    #[test]
    fn sizes_clip_to_the_window() {
        let s = ChunkSizes::clipped(512, 4096, 2048, 1024).expect("clip");
        assert_eq!(
            s,
            ChunkSizes {
                min: 512,
                max: 1024
            }
        );
        let s = ChunkSizes::clipped(512, 4096, 1024, 800).expect("clip");
        assert_eq!(s, ChunkSizes { min: 224, max: 224 });
        assert!(ChunkSizes::clipped(512, 4096, 1000, 1000).is_err());
        assert!(ChunkSizes::clipped(10, 5, 1000, 0).is_err());
    }

    #[test]
    fn passages_follow_the_pieces_across_a_file_boundary() {
        let loc = ChunkLocation {
            chunk: 3,
            pieces: corpus().pieces(90, 30),
        };
        assert_eq!(location_tokens(&loc), 30);
        let piece = |file: &str, start, end| ChunkPiece {
            file: file.into(),
            start,
            end,
        };
        // Inside the first piece, across the boundary, inside the second, clipped at the end.
        assert_eq!(passage(&loc, 2, 5).pieces, vec![piece("a", 92, 97)]);
        assert_eq!(
            passage(&loc, 8, 4).pieces,
            vec![piece("a", 98, 100), piece("b", 0, 2)]
        );
        assert_eq!(passage(&loc, 12, 3).pieces, vec![piece("b", 2, 5)]);
        assert_eq!(passage(&loc, 25, 10).pieces, vec![piece("b", 15, 20)]);
        assert_eq!(passage(&loc, 2, 5).chunk, 3);
    }

    #[test]
    fn short_corpus_gives_whole_corpus() {
        let c = corpus();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let loc = draw_chunk(&c, ChunkSizes { min: 500, max: 900 }, 0, &mut rng);
        let len: u64 = loc.pieces.iter().map(|p| p.end - p.start).sum();
        assert_eq!(len, 150);
    }
}
