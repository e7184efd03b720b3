//! Language codes: from what a dataset calls a language to one normalised code, and from what a
//! user types (`en`, `de`, `zh`, `swa`, `eng_Latn`, or the dataset's own code) to the languages
//! of a task.
//!
//! The normalised code (`lang_code`) is FLORES-200 style: ISO 639-3 + `_` + ISO 15924 script,
//! e.g. `eng_Latn`, `zho_Hans`, `swh_Latn`. SIB-200 uses it natively; the other datasets are
//! mapped by the tables below (sources: each dataset's README and ISO 639-3).

use crate::error::{Error, Result};
use crate::util::suggestions;

/// ISO 639-1 two-letter codes to ISO 639-3 candidates, most specific first. Macrolanguages map to
/// the individual language the datasets use (e.g. `sw` -> Swahili `swh`, then macro `swa`).
const ISO1_TO_ISO3: &[(&str, &[&str])] = &[
    ("af", &["afr"]),
    ("ak", &["aka", "twi"]),
    ("am", &["amh"]),
    ("ar", &["arb", "ara"]),
    ("as", &["asm"]),
    ("ay", &["ayr", "aym"]),
    ("az", &["azj", "azb", "aze"]),
    ("ba", &["bak"]),
    ("be", &["bel"]),
    ("bg", &["bul"]),
    ("bm", &["bam"]),
    ("bn", &["ben"]),
    ("bo", &["bod"]),
    ("bs", &["bos"]),
    ("ca", &["cat"]),
    ("cs", &["ces"]),
    ("cy", &["cym"]),
    ("da", &["dan"]),
    ("de", &["deu"]),
    ("dz", &["dzo"]),
    ("ee", &["ewe"]),
    ("el", &["ell"]),
    ("en", &["eng"]),
    ("eo", &["epo"]),
    ("es", &["spa"]),
    ("et", &["est", "ekk"]),
    ("eu", &["eus"]),
    ("fa", &["pes", "fas"]),
    ("ff", &["fuv", "ful"]),
    ("fi", &["fin"]),
    ("fj", &["fij"]),
    ("fo", &["fao"]),
    ("fr", &["fra"]),
    ("ga", &["gle"]),
    ("gd", &["gla"]),
    ("gl", &["glg"]),
    ("gn", &["grn"]),
    ("gu", &["guj"]),
    ("ha", &["hau"]),
    ("he", &["heb"]),
    ("hi", &["hin"]),
    ("hr", &["hrv"]),
    ("ht", &["hat"]),
    ("hu", &["hun"]),
    ("hy", &["hye"]),
    ("id", &["ind"]),
    ("ig", &["ibo"]),
    ("is", &["isl"]),
    ("it", &["ita"]),
    ("ja", &["jpn"]),
    ("jv", &["jav"]),
    ("ka", &["kat"]),
    ("kg", &["kon"]),
    ("ki", &["kik"]),
    ("kk", &["kaz"]),
    ("km", &["khm"]),
    ("kn", &["kan"]),
    ("ko", &["kor"]),
    ("kr", &["knc", "kau"]),
    ("ks", &["kas"]),
    ("ku", &["kmr", "ckb", "kur"]),
    ("ky", &["kir"]),
    ("lb", &["ltz"]),
    ("lg", &["lug"]),
    ("li", &["lim"]),
    ("ln", &["lin"]),
    ("lo", &["lao"]),
    ("lt", &["lit"]),
    ("lv", &["lvs", "lav"]),
    ("mg", &["plt", "mlg"]),
    ("mi", &["mri"]),
    ("mk", &["mkd"]),
    ("ml", &["mal"]),
    ("mn", &["khk", "mon"]),
    ("mr", &["mar"]),
    ("ms", &["zsm", "msa"]),
    ("mt", &["mlt"]),
    ("my", &["mya"]),
    ("nb", &["nob"]),
    ("ne", &["npi", "nep"]),
    ("nl", &["nld"]),
    ("nn", &["nno"]),
    ("no", &["nob", "nor"]),
    ("ny", &["nya"]),
    ("oc", &["oci"]),
    ("om", &["gaz", "orm"]),
    ("or", &["ory"]),
    ("pa", &["pan"]),
    ("pl", &["pol"]),
    ("ps", &["pbt", "pus"]),
    ("pt", &["por"]),
    ("qu", &["quy", "qve", "que"]),
    ("rn", &["run"]),
    ("ro", &["ron"]),
    ("ru", &["rus"]),
    ("rw", &["kin"]),
    ("sa", &["san"]),
    ("sc", &["srd"]),
    ("sd", &["snd"]),
    ("sg", &["sag"]),
    ("si", &["sin"]),
    ("sk", &["slk"]),
    ("sl", &["slv"]),
    ("sm", &["smo"]),
    ("sn", &["sna"]),
    ("so", &["som"]),
    ("sq", &["als", "sqi"]),
    ("sr", &["srp"]),
    ("ss", &["ssw"]),
    ("st", &["sot"]),
    ("su", &["sun"]),
    ("sv", &["swe"]),
    ("sw", &["swh", "swa"]),
    ("ta", &["tam"]),
    ("te", &["tel"]),
    ("tg", &["tgk"]),
    ("th", &["tha"]),
    ("ti", &["tir"]),
    ("tk", &["tuk"]),
    ("tl", &["tgl"]),
    ("tn", &["tsn"]),
    ("tr", &["tur"]),
    ("ts", &["tso"]),
    ("tt", &["tat"]),
    ("tw", &["twi", "aka"]),
    ("ug", &["uig"]),
    ("uk", &["ukr"]),
    ("ur", &["urd"]),
    ("uz", &["uzn", "uzb"]),
    ("vi", &["vie"]),
    ("wo", &["wol"]),
    ("xh", &["xho"]),
    ("yi", &["ydd", "yid"]),
    ("yo", &["yor"]),
    ("zh", &["zho"]),
    ("zu", &["zul"]),
];

/// ISO 639-3 macrolanguage codes to the individual languages the datasets use.
const MACRO_TO_INDIVIDUAL: &[(&str, &[&str])] = &[
    ("ara", &["arb"]),
    ("aym", &["ayr"]),
    ("aze", &["azj"]),
    ("est", &["ekk"]),
    ("fas", &["pes"]),
    ("ful", &["fuv"]),
    ("kau", &["knc"]),
    ("kur", &["kmr"]),
    ("lav", &["lvs"]),
    ("mlg", &["plt"]),
    ("mon", &["khk"]),
    ("msa", &["zsm"]),
    ("nep", &["npi"]),
    ("nor", &["nob"]),
    ("orm", &["gaz"]),
    ("pus", &["pbt"]),
    ("que", &["quy", "qve"]),
    ("sqi", &["als"]),
    ("swa", &["swh"]),
    ("swh", &["swa"]),
    ("uzb", &["uzn"]),
    ("yid", &["ydd"]),
    ("zho", &["zho"]),
];

/// The script chosen when a bare language code matches several scripts of one language.
const DEFAULT_SCRIPT: &[(&str, &str)] = &[
    ("ace", "Latn"),
    ("arb", "Arab"),
    ("bjn", "Latn"),
    ("kas", "Arab"),
    ("knc", "Latn"),
    ("min", "Latn"),
    ("taq", "Latn"),
    ("zho", "Hans"),
];

/// The ISO 639-3 part of a normalised code (`eng_Latn` -> `eng`).
pub fn iso3_of(lang_code: &str) -> &str {
    lang_code.split('_').next().unwrap_or(lang_code)
}

/// One language of a task as the data names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LangEntry {
    /// The dataset's own code, e.g. `sw`, `english`, `swh_Latn`.
    pub lang: String,
    /// The normalised code, e.g. `swh_Latn`.
    pub lang_code: String,
}

/// Resolves one user-typed language code against the languages a task has.
///
/// Order of matching: the dataset's own code or the normalised code (case-insensitive); then an
/// ISO 639-1 or 639-3 code (macrolanguages included) against the ISO 639-3 part of the
/// normalised codes. Several scripts of one language resolve to its default script (e.g. `zh` ->
/// `zho_Hans`) or are reported as ambiguous. Unknown codes get close-match suggestions.
pub fn resolve<'a>(task: &str, code: &str, langs: &'a [LangEntry]) -> Result<&'a LangEntry> {
    let c = code.trim();
    if let Some(e) = langs
        .iter()
        .find(|e| e.lang.eq_ignore_ascii_case(c) || e.lang_code.eq_ignore_ascii_case(c))
    {
        return Ok(e);
    }
    let lc = c.to_ascii_lowercase();
    let mut candidates: Vec<&str> = Vec::new();
    if !lc.contains('_') {
        if let Some((_, c3)) = ISO1_TO_ISO3.iter().find(|(k, _)| *k == lc) {
            candidates.extend_from_slice(c3);
        }
        if lc.len() == 3 {
            candidates.push(lc.as_str());
            if let Some((_, ind)) = MACRO_TO_INDIVIDUAL.iter().find(|(k, _)| *k == lc) {
                candidates.extend_from_slice(ind);
            }
        }
    }
    for cand in candidates {
        let hits: Vec<&LangEntry> = langs
            .iter()
            .filter(|e| iso3_of(&e.lang_code) == cand)
            .collect();
        match hits.len() {
            0 => continue,
            1 => return Ok(hits[0]),
            _ => {
                if let Some((_, script)) = DEFAULT_SCRIPT.iter().find(|(k, _)| *k == cand) {
                    let want = format!("{cand}_{script}");
                    if let Some(e) = hits.iter().find(|e| e.lang_code == want) {
                        return Ok(e);
                    }
                }
                return Err(Error::AmbiguousLanguage {
                    code: code.to_string(),
                    task: task.to_string(),
                    matches: hits.iter().map(|e| e.lang_code.clone()).collect(),
                });
            }
        }
    }
    let known = langs
        .iter()
        .flat_map(|e| [e.lang.as_str(), e.lang_code.as_str()]);
    Err(Error::Unknown {
        kind: "language",
        code: code.to_string(),
        scope: format!(" in task `{task}`"),
        suggestions: suggestions(c, known),
    })
}

/// Resolves each code on its own, collecting the languages found (once each, in order) and a
/// message for every code that fails, so a caller can report all bad codes at once.
pub fn resolve_each<'a>(
    task: &str,
    codes: &[String],
    langs: &'a [LangEntry],
    problems: &mut Vec<String>,
) -> Vec<&'a LangEntry> {
    let mut chosen: Vec<&LangEntry> = Vec::new();
    for c in codes {
        match resolve_list(task, std::slice::from_ref(c), langs) {
            Ok(found) => {
                for e in found {
                    if !chosen.iter().any(|x| x.lang == e.lang) {
                        chosen.push(e);
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    chosen
}

/// Resolves a comma-separated list (or `all`) to distinct entries, in the order given.
pub fn resolve_list<'a>(
    task: &str,
    codes: &[String],
    langs: &'a [LangEntry],
) -> Result<Vec<&'a LangEntry>> {
    if codes.len() == 1 && codes[0].eq_ignore_ascii_case("all") {
        return Ok(langs.iter().collect());
    }
    let mut out: Vec<&LangEntry> = Vec::new();
    for c in codes {
        let e = resolve(task, c, langs)?;
        if !out.iter().any(|o| o.lang_code == e.lang_code) {
            out.push(e);
        }
    }
    Ok(out)
}

/// NusaX-Senti folder name -> normalised code.
pub const NUSAX: &[(&str, &str)] = &[
    ("acehnese", "ace_Latn"),
    ("balinese", "ban_Latn"),
    ("banjarese", "bjn_Latn"),
    ("buginese", "bug_Latn"),
    ("english", "eng_Latn"),
    ("indonesian", "ind_Latn"),
    ("javanese", "jav_Latn"),
    ("madurese", "mad_Latn"),
    ("minangkabau", "min_Latn"),
    ("ngaju", "nij_Latn"),
    ("sundanese", "sun_Latn"),
    ("toba_batak", "bbc_Latn"),
];

/// AfriSenti file code -> normalised code (`kr` is Kinyarwanda, `ma` Moroccan Darija, `dz`
/// Algerian Darja, `pt` Mozambican Portuguese).
pub const AFRISENTI: &[(&str, &str)] = &[
    ("am", "amh_Ethi"),
    ("dz", "arq_Arab"),
    ("ha", "hau_Latn"),
    ("ig", "ibo_Latn"),
    ("kr", "kin_Latn"),
    ("ma", "ary_Arab"),
    ("pcm", "pcm_Latn"),
    ("pt", "por_Latn"),
    ("sw", "swa_Latn"),
    ("ts", "tso_Latn"),
    ("twi", "twi_Latn"),
    ("yo", "yor_Latn"),
];

/// XCOPA code -> normalised code (`qu` is Eastern Apurímac Quechua, ISO `qve`).
pub const XCOPA: &[(&str, &str)] = &[
    ("et", "est_Latn"),
    ("ht", "hat_Latn"),
    ("id", "ind_Latn"),
    ("it", "ita_Latn"),
    ("qu", "qve_Latn"),
    ("sw", "swh_Latn"),
    ("ta", "tam_Taml"),
    ("th", "tha_Thai"),
    ("tr", "tur_Latn"),
    ("vi", "vie_Latn"),
    ("zh", "zho_Hans"),
];

/// MGSM code -> normalised code.
pub const MGSM: &[(&str, &str)] = &[
    ("bn", "ben_Beng"),
    ("de", "deu_Latn"),
    ("en", "eng_Latn"),
    ("es", "spa_Latn"),
    ("fr", "fra_Latn"),
    ("ja", "jpn_Jpan"),
    ("ru", "rus_Cyrl"),
    ("sw", "swh_Latn"),
    ("te", "tel_Telu"),
    ("th", "tha_Thai"),
    ("zh", "zho_Hans"),
];

/// Looks a dataset code up in one of the tables above.
pub fn lookup(table: &[(&'static str, &'static str)], code: &str) -> Option<&'static str> {
    table.iter().find(|(k, _)| *k == code).map(|(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib() -> Vec<LangEntry> {
        [
            "eng_Latn", "fra_Latn", "swh_Latn", "zho_Hans", "zho_Hant", "arb_Arab", "arb_Latn",
            "quy_Latn", "ekk_Latn",
        ]
        .iter()
        .map(|c| LangEntry {
            lang: c.to_string(),
            lang_code: c.to_string(),
        })
        .collect()
    }

    #[test]
    fn two_letter_codes_resolve() {
        let l = sib();
        assert_eq!(resolve("sib200", "en", &l).unwrap().lang_code, "eng_Latn");
        assert_eq!(resolve("sib200", "sw", &l).unwrap().lang_code, "swh_Latn");
        assert_eq!(resolve("sib200", "zh", &l).unwrap().lang_code, "zho_Hans");
        assert_eq!(resolve("sib200", "ar", &l).unwrap().lang_code, "arb_Arab");
        assert_eq!(resolve("sib200", "qu", &l).unwrap().lang_code, "quy_Latn");
        assert_eq!(resolve("sib200", "et", &l).unwrap().lang_code, "ekk_Latn");
        assert_eq!(
            resolve("sib200", "ZHO_HANT", &l).unwrap().lang_code,
            "zho_Hant"
        );
        assert_eq!(resolve("sib200", "swa", &l).unwrap().lang_code, "swh_Latn");
    }

    #[test]
    fn dataset_codes_win_over_iso() {
        // AfriSenti's `kr` is Kinyarwanda, not ISO 639-1 Kanuri.
        let l: Vec<LangEntry> = AFRISENTI
            .iter()
            .map(|(a, b)| LangEntry {
                lang: a.to_string(),
                lang_code: b.to_string(),
            })
            .collect();
        assert_eq!(
            resolve("afrisenti", "kr", &l).unwrap().lang_code,
            "kin_Latn"
        );
        assert_eq!(
            resolve("afrisenti", "sw", &l).unwrap().lang_code,
            "swa_Latn"
        );
        assert_eq!(
            resolve("afrisenti", "rw", &l).unwrap().lang_code,
            "kin_Latn"
        );
    }

    #[test]
    fn unknown_code_suggests() {
        let l = sib();
        let e = resolve("sib200", "eng_Latm", &l).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("eng_Latm") && msg.contains("did you mean eng_Latn"),
            "{msg}"
        );
        assert!(e.is_user_error());
    }

    #[test]
    fn ambiguous_without_default_script() {
        let l = vec![
            LangEntry {
                lang: "x_Latn".into(),
                lang_code: "kas_Deva".into(),
            },
            LangEntry {
                lang: "x_Arab".into(),
                lang_code: "kas_Latn".into(),
            },
        ];
        let e = resolve("t", "ks", &l).unwrap_err();
        assert!(matches!(e, Error::AmbiguousLanguage { .. }), "{e}");
    }
}
