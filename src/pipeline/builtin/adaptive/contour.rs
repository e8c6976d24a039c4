//! How the speech before a pause ended: the pitch and energy contour of its
//! last few hundred milliseconds, and what the transcript so far ends with.
//!
//! [`measure`] compares the end of the speech before the pause (a window of a
//! few hundred milliseconds, about the last syllable) with the speech before
//! it (up to the detector's history, 2 s): the F0 in semitones and the peak
//! level in dB. [`classify`] turns that into an [`Ending`]: a
//! finished sentence's pitch and energy both fall (declarative final fall);
//! at a mid-sentence pause the pitch stays level or rises (a continuation
//! rise). [`transcript_cue`] reads a partial transcript's end.

use std::time::Duration;

/// Semitones from the median beyond which a pitch value is taken for an
/// octave error of the estimator and left out of the fit.
const OUTLIER_SEMITONES: f32 = 6.0;

/// The fewest voiced frames a pitch comparison needs overall (half as many
/// in the window).
pub const MIN_VOICED_FRAMES: usize = 4;

/// What the detector heard in one speech frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Observation {
    /// The frame's end on the audio clock (time since the detector started).
    pub at: Duration,
    /// The frame's RMS level in dBFS.
    pub level_db: f32,
    /// Its fundamental frequency, when voiced.
    pub f0_hz: Option<f32>,
}

/// The contour of the speech before a pause.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Contour {
    /// The pitch at the end against the speech before, in semitones
    /// (negative: it ended lower); `None` with too few voiced frames.
    pub pitch_change: Option<f32>,
    /// The peak level at the end against the usual peaks, in dB (negative:
    /// it ended quieter); `None` with fewer than two frames.
    pub energy_change: Option<f32>,
    /// Voiced frames in the window.
    pub voiced_frames: usize,
}

/// What a pause after speech sounds like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Falling pitch and falling energy: a finished statement.
    Finished,
    /// Level or rising pitch, or energy that does not fall: the speaker goes on.
    Continuing,
    /// Too little voiced speech to tell.
    Unknown,
}

/// What the end of a partial transcript says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranscriptCue {
    /// It ends like a sentence: `.`, `?`, `!` or their full-width forms.
    Complete,
    /// It trails off (`...`, `…`), ends with a comma, a filler ("um", "uh", "so", ...), a conjunction
    /// ("and", "but", "because", ...), an article or a preposition that needs
    /// a word after it.
    Unfinished,
    /// Anything else (e.g. words without punctuation, as many recognizers'
    /// partials are), or nothing: the transcript does not say.
    Neutral,
}

/// Words that, last in a transcript, say the speaker is not done: fillers,
/// conjunctions, articles and prepositions that need what follows.
pub const TRAILING_WORDS: &[&str] = &[
    // fillers
    "um", "umm", "uh", "uhm", "er", "erm", "hmm", "mm", "so", "like", "well",
    // conjunctions
    "and", "but", "or", "nor", "because", "cause", "then", "if", "that", "which", "who", "when",
    "while", "although", "though", "unless", "until", "whether", "than",
    // articles, prepositions and other words that need a complement
    "the", "a", "an", "of", "to", "for", "with", "in", "on", "at", "from", "my", "your", "our",
    "their", "is", "are", "was", "i",
];

/// Reads the end of a partial transcript; see [`TranscriptCue`].
pub fn transcript_cue(text: &str) -> TranscriptCue {
    let text = text.trim_end();
    if text.is_empty() {
        return TranscriptCue::Neutral;
    }
    if text.ends_with("..") || text.ends_with([',', ';', ':', '-', '—', '…', '、', '，']) {
        return TranscriptCue::Unfinished;
    }
    if text.ends_with(['.', '?', '!', '。', '？', '！']) {
        return TranscriptCue::Complete;
    }
    let last = text
        .rsplit(|c: char| c.is_whitespace())
        .next()
        .unwrap_or("")
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase();
    if TRAILING_WORDS.contains(&last.as_str()) {
        TranscriptCue::Unfinished
    } else {
        TranscriptCue::Neutral
    }
}

/// The value at quantile `q` (0..=1) of `values`, sorted in place; `None`
/// when empty.
fn quantile(values: &mut [f32], q: f32) -> Option<f32> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f32::total_cmp);
    let at = ((values.len() - 1) as f32 * q).round() as usize;
    Some(values[at])
}

/// The contour of the last `window` of `history` against all of it.
///
/// * Pitch: the median F0 of the voiced frames in the window against the
///   median of all voiced frames in `history`, in semitones. Values more than
///   6 semitones from the overall median (octave errors of the estimator)
///   are left out. `None` unless both have [`MIN_VOICED_FRAMES`] / 2 and
///   [`MIN_VOICED_FRAMES`] frames.
/// * Energy: the loudest frame in the window against the 90th percentile of
///   all frames' levels, in dB (a syllable's peak against the speaker's
///   usual peaks, so the dips between syllables do not count).
pub fn measure(history: &[Observation], window: Duration) -> Contour {
    let Some(last) = history.last() else {
        return Contour::default();
    };
    let from = last.at.saturating_sub(window);
    let split = history.partition_point(|o| o.at <= from);
    let recent = &history[split..];
    let tone = |o: &Observation| o.f0_hz.map(|hz| 12.0 * (hz / 100.0).log2());
    let mut levels: Vec<f32> = history.iter().map(|o| o.level_db).collect();
    let reference_level = quantile(&mut levels, 0.9);
    let final_level = recent.iter().map(|o| o.level_db).reduce(f32::max);
    let energy_change = match (final_level, reference_level) {
        (Some(f), Some(r)) if history.len() >= 2 => Some(f - r),
        _ => None,
    };
    let mut all: Vec<f32> = history.iter().filter_map(tone).collect();
    let Some(median) = quantile(&mut all, 0.5) else {
        return Contour {
            energy_change,
            ..Contour::default()
        };
    };
    let plausible = |t: &f32| (t - median).abs() <= OUTLIER_SEMITONES;
    let mut overall: Vec<f32> = all.iter().copied().filter(plausible).collect();
    let mut ending: Vec<f32> = recent.iter().filter_map(tone).filter(plausible).collect();
    let voiced_frames = ending.len();
    let pitch_change = if overall.len() >= MIN_VOICED_FRAMES
        && ending.len() >= MIN_VOICED_FRAMES / 2
    {
        Some(quantile(&mut ending, 0.5).unwrap_or(0.0) - quantile(&mut overall, 0.5).unwrap_or(0.0))
    } else {
        None
    };
    Contour {
        pitch_change,
        energy_change,
        voiced_frames,
    }
}

/// The [`Ending`] of `contour`: [`Ending::Finished`] when the pitch fell by
/// at least `pitch_fall` semitones and the energy by at least `energy_fall`
/// dB; [`Ending::Unknown`] without a pitch fit; otherwise
/// [`Ending::Continuing`].
pub fn classify(contour: &Contour, pitch_fall: f32, energy_fall: f32) -> Ending {
    let Some(pitch) = contour.pitch_change else {
        return Ending::Unknown;
    };
    let energy = contour.energy_change.unwrap_or(0.0);
    if pitch <= -pitch_fall && energy <= -energy_fall {
        Ending::Finished
    } else {
        Ending::Continuing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Observations every 20 ms from `f0` and `level` as functions of time (s).
    fn track(
        ms: u64,
        f0: impl Fn(f32) -> Option<f32>,
        level: impl Fn(f32) -> f32,
    ) -> Vec<Observation> {
        (1..=ms / 20)
            .map(|i| {
                let t = (i * 20) as f32 / 1000.0;
                Observation {
                    at: Duration::from_millis(i * 20),
                    level_db: level(t),
                    f0_hz: f0(t),
                }
            })
            .collect()
    }

    const WINDOW: Duration = Duration::from_millis(200);

    #[test]
    fn a_final_fall_is_finished() {
        // Level for a second, then 6 semitones and 10 dB down over 400 ms.
        let h = track(
            1400,
            |t| Some(180.0 * 2f32.powf(-6.0 * (t - 1.0).max(0.0) / 0.4 / 12.0)),
            |t| -20.0 - 10.0 * (t - 1.0).max(0.0) / 0.4,
        );
        let c = measure(&h, WINDOW);
        // The last 200 ms span -3..-6 semitones (median -4.5) and peak at
        // -5 dB, against a median of 0 and usual peaks at 0 dB.
        assert!((c.pitch_change.unwrap() + 4.5).abs() < 0.5, "{c:?}");
        assert!((c.energy_change.unwrap() + 5.0).abs() < 0.6, "{c:?}");
        assert_eq!(classify(&c, 2.0, 3.0), Ending::Finished);
    }

    #[test]
    fn level_or_rising_pitch_continues_whatever_the_energy() {
        let level = track(1000, |_| Some(150.0), |t| -20.0 - 10.0 * t);
        let c = measure(&level, WINDOW);
        assert!(c.pitch_change.unwrap().abs() < 0.1, "{c:?}");
        assert_eq!(classify(&c, 2.0, 3.0), Ending::Continuing);
        let rising = track(1000, |t| Some(150.0 * 2f32.powf(3.0 * t / 12.0)), |_| -20.0);
        let c = measure(&rising, WINDOW);
        assert!(c.pitch_change.unwrap() > 1.0, "{c:?}");
        assert!(c.energy_change.unwrap().abs() < 0.1, "{c:?}");
        assert_eq!(classify(&c, 2.0, 3.0), Ending::Continuing);
        // A falling pitch at steady energy is not enough either.
        let falling_pitch = track(
            1000,
            |t| Some(150.0 * 2f32.powf(-8.0 * t / 12.0)),
            |_| -20.0,
        );
        assert_eq!(
            classify(&measure(&falling_pitch, WINDOW), 2.0, 3.0),
            Ending::Continuing
        );
    }

    #[test]
    fn unvoiced_endings_are_unknown_and_octave_errors_are_ignored() {
        let unvoiced = track(1000, |_| None, |_| -25.0);
        let c = measure(&unvoiced, WINDOW);
        assert_eq!(c.pitch_change, None);
        assert_eq!(classify(&c, 2.0, 3.0), Ending::Unknown);
        assert_eq!(classify(&measure(&[], WINDOW), 2.0, 3.0), Ending::Unknown);
        // A level 150 Hz with two frames doubled: still level.
        let mut h = track(1000, |_| Some(150.0), |_| -20.0);
        let n = h.len();
        h[n - 2].f0_hz = Some(300.0);
        h[n - 5].f0_hz = Some(75.0);
        let c = measure(&h, WINDOW);
        assert!(c.pitch_change.unwrap().abs() < 0.1, "{c:?}");
    }

    #[test]
    fn the_end_is_compared_with_what_came_before() {
        // A big fall long before the window, level at the end: the end is
        // at the speaker's usual pitch.
        let h = track(
            2000,
            |t| Some(if t < 1.0 { 250.0 - 100.0 * t } else { 150.0 }),
            |_| -20.0,
        );
        assert!(measure(&h, WINDOW).pitch_change.unwrap().abs() < 0.5);
    }

    #[test]
    fn transcript_cues() {
        for done in ["Hello.", "Really?  ", "Stop!", "好。", "Is it on?"] {
            assert_eq!(transcript_cue(done), TranscriptCue::Complete, "{done:?}");
        }
        for open in [
            "I want to",
            "I was thinking um",
            "and then, uh...",
            "it's cheap and",
            "pasta, pizza,",
            "So",
            "the one with the",
            "Because",
            "well…",
        ] {
            assert_eq!(transcript_cue(open), TranscriptCue::Unfinished, "{open:?}");
        }
        for neutral in ["", "  ", "book a table for four", "yes please"] {
            assert_eq!(
                transcript_cue(neutral),
                TranscriptCue::Neutral,
                "{neutral:?}"
            );
        }
    }
}
