//! The paper's dataset filters (Ramesh et al. 2021 appendix C): short captions, non-English
//! captions, boilerplate captions, extreme aspect ratios, plus decompression-bomb limits.

use regex::Regex;

/// Patterns of captions that describe the file rather than the picture. Each is a regular
/// expression matched case-insensitively anywhere in the caption.
pub const DEFAULT_BOILERPLATE: [&str; 6] = [
    r"\bphotographed (on|in|at)\b",
    r"^(img|dsc|dscn|image|photo|picture|pic)[\s_-]*\d+",
    r"\bstock (photo|image|photography)\b",
    r"^(untitled|no description|no caption|image|photo|picture)\.?$",
    r"\b\d{4}-\d{2}-\d{2}\b",
    r"\bclick (here|to)\b",
];

/// PIL's `MAX_IMAGE_PIXELS`: images declaring more pixels are treated as decompression bombs.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// The most frequent English function words; a caption of five or more words that contains
/// none of them is taken as not English.
const COMMON_ENGLISH: [&str; 48] = [
    "a", "an", "the", "of", "and", "in", "on", "at", "to", "with", "for", "by", "from", "is",
    "are", "was", "it", "this", "that", "there", "some", "two", "three", "one", "all", "its",
    "his", "her", "their", "or", "as", "near", "under", "over", "above", "below", "next", "into",
    "up", "down", "man", "woman", "people", "red", "blue", "green", "white", "black",
];

/// Which checks to apply. Every rejection is counted under its reason.
#[derive(Clone, Debug)]
pub struct Filters {
    pub min_words: usize,
    pub english_only: bool,
    pub boilerplate: Vec<Regex>,
    pub min_aspect: f64,
    pub max_aspect: f64,
    pub max_pixels: u64,
}

impl Default for Filters {
    fn default() -> Self {
        Filters::new(2, true, &[], true)
            .unwrap_or_else(|_| unreachable!("default patterns are valid"))
    }
}

impl Filters {
    /// Filters with the default aspect and pixel limits; `extra` patterns are added to the
    /// defaults (or replace them when `with_defaults` is false).
    pub fn new(
        min_words: usize,
        english_only: bool,
        extra: &[String],
        with_defaults: bool,
    ) -> Result<Self, String> {
        let mut pats: Vec<String> = if with_defaults {
            DEFAULT_BOILERPLATE.iter().map(|s| s.to_string()).collect()
        } else {
            vec![]
        };
        pats.extend(extra.iter().cloned());
        let boilerplate = pats
            .iter()
            .map(|p| {
                Regex::new(&format!("(?i){p}"))
                    .map_err(|e| format!("bad boilerplate pattern `{p}`: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Filters {
            min_words,
            english_only,
            boilerplate,
            min_aspect: 0.5,
            max_aspect: 2.0,
            max_pixels: DEFAULT_MAX_PIXELS,
        })
    }

    /// The reason a caption is rejected, if it is.
    pub fn check_caption(&self, text: &str) -> Option<&'static str> {
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.len() < self.min_words {
            return Some("caption_too_short");
        }
        if self.english_only && !looks_english(&words) {
            return Some("not_english");
        }
        if self.boilerplate.iter().any(|r| r.is_match(text.trim())) {
            return Some("boilerplate");
        }
        None
    }

    /// The reason an image of `w`×`h` is rejected, if it is.
    pub fn check_dims(&self, w: u32, h: u32) -> Option<&'static str> {
        if w == 0 || h == 0 {
            return Some("undecodable");
        }
        if w as u64 * h as u64 > self.max_pixels {
            return Some("oversized");
        }
        let r = w as f64 / h as f64;
        if r < self.min_aspect || r > self.max_aspect {
            return Some("aspect_ratio");
        }
        None
    }
}

/// The documented heuristic: at least 90% of the letters are ASCII, and a caption of five or
/// more words contains at least one common English function word.
pub fn looks_english(words: &[&str]) -> bool {
    let (mut letters, mut ascii) = (0usize, 0usize);
    for c in words
        .iter()
        .flat_map(|w| w.chars())
        .filter(|c| c.is_alphabetic())
    {
        letters += 1;
        ascii += c.is_ascii_alphabetic() as usize;
    }
    if letters == 0 || (ascii as f64) < 0.9 * letters as f64 {
        return false;
    }
    if words.len() < 5 {
        return true;
    }
    words.iter().any(|w| {
        let w = w
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        COMMON_ENGLISH.contains(&w.as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_filters() {
        let f = Filters::default();
        assert_eq!(f.check_caption("a red circle at the top"), None);
        assert_eq!(f.check_caption("circle"), Some("caption_too_short"));
        assert_eq!(
            f.check_caption("un chat noir sur le canapé dans la cuisine"),
            Some("not_english")
        );
        assert_eq!(f.check_caption("красный круг"), Some("not_english"));
        assert_eq!(
            f.check_caption("photographed on 2019-04-01 by a tourist"),
            Some("boilerplate")
        );
        assert_eq!(f.check_caption("IMG_2041 jpg"), Some("boilerplate"));
    }

    #[test]
    fn dimension_filters() {
        let f = Filters::default();
        assert_eq!(f.check_dims(64, 64), None);
        assert_eq!(f.check_dims(300, 100), Some("aspect_ratio"));
        assert_eq!(f.check_dims(100, 201), Some("aspect_ratio"));
        assert_eq!(f.check_dims(30_000, 30_000), Some("oversized"));
    }
}
