"""Build data/devils_dictionary.jsonl from Debian's dict-devil package.

Source
------
Ambrose Bierce, *The Devil's Dictionary* (1911, public domain), in the Internet
Wiretap 1st Online Edition (1993) as packaged for dictd by Debian (`dict-devil`).
Get it with:

    cd /tmp && apt-get update && apt-get download dict-devil
    dpkg -x dict-devil_*.deb /tmp/devil
    # -> /tmp/devil/usr/share/dictd/devil.dict.dz and devil.index

Format
------
devil.dict.dz is dictzip, which is plain gzip to a reader: the entries' text, one
after another, each beginning with a line like "ABASEMENT, n.  A decent ...".
devil.index has one line per headword: "headword<TAB>offset<TAB>length", the two
numbers in dictd's base64 (A-Z a-z 0-9 + /), locating the entry in the unzipped text.
Some index rows are aliases (BABE and BABY share a span), the "00database*" rows
are metadata, and two entries (PRECEDENT, PRECIPITATE) occur twice in the text.

Inside an entry, blocks are separated by blank lines.  Prose is hard-wrapped at
column 70 with a paragraph marked by an indented first line; verse is indented
four or more spaces; the attribution of a quotation is pushed right to column 70;
quoted prose is indented 8 (first line) and 4 (the rest); dialogues hang-indent
the lines after a "SPEAKER:" label.  This script unwraps prose into paragraphs,
keeps verse lines (with their indentation relative to the stanza), puts an
attribution on its own line as "-- Name", turns the dictd cross-reference
markup {WORD} into WORD, and collapses runs of spaces.  Underscores marking
italics (_Cogito ergo sum_) are kept as in the source.

Each entry becomes one JSON line, in the dictionary's order:
    {"instruction": "Define the word \"Abasement\" in the style of Ambrose Bierce's
     The Devil's Dictionary.", "input": "", "output": "ABASEMENT, n. A decent ..."}
Entries listed in data/excluded_entries.txt (offensive; see that file), entries
whose whole definition is a cross-reference ("See HUSBAND."), and exact
duplicates are left out; the counts are printed.

Regenerate (stdlib only):
    python data/make_devils_dictionary.py /tmp/devil/usr/share/dictd/devil.dict.dz
"""

import argparse
import gzip
import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
INSTRUCTION = "Define the word \"{}\" in the style of Ambrose Bierce's The Devil's Dictionary."
POS = r"(?:adj\. and n\.|n\.pl\.|n\.|v\.t\.|v\.i\.|v\.|adj\.|adv\.|p\.p\.|pp\.|pron\.|pro\.|x\.)"
HEAD_WITH_POS = re.compile(r"(?P<hw>.+?)(?:,\s*|\s+)(?P<pos>" + POS + r")(?=\s|$)")
HEAD_NO_POS = re.compile(r"(?P<hw>[A-Z][A-Z.' ]*?[.?])(?=\s|$)")  # LL.D.  R.I.P.  CUI BONO?
HEAD_LETTER = re.compile(r"(?P<hw>[A-Z])(?=[ ,])")  # "I is the first letter ..."
SPEAKER = re.compile(r"[A-Z][A-Z .']+:  ")  # "LUNARIAN:  Then when your Congress ..."
CROSS_REF_ONLY = re.compile(r"\(?See [A-Z][A-Z' -]*\.?\)?\.?")
CASE_FIXES = {"WALL STREET": "Wall Street", "UN-AMERICAN": "Un-American", "PRE-ADAMITE": "Pre-Adamite"}


def b64(s):
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def read_entries(dict_dz, index):
    """Entry texts in dictionary order (by offset), aliases folded together."""
    text = gzip.open(dict_dz).read()
    spans = set()
    for line in Path(index).read_text(encoding="utf-8").splitlines():
        word, off, length = line.split("\t")
        if not word.startswith("00database"):
            spans.add((b64(off), b64(length)))
    return [text[o:o + n].decode("utf-8") for o, n in sorted(spans)]


def indent(line):
    return len(line) - len(line.lstrip(" "))


def squash(s):
    return re.sub(r" {2,}", " ", s.strip())


def unwrap(lines):
    """Join hard-wrapped lines into one paragraph ("cannon-\\nshot" -> "cannon-shot")."""
    out = ""
    for line in lines:
        line = line.strip()
        if out and re.search(r"[A-Za-z]-$", out):
            out += line
        else:
            out += (" " if out else "") + line
    return squash(out)


def is_attribution(line):
    """The source of a quotation is set flush right, ending at column 69-70."""
    return indent(line) >= 12 and len(line) in (69, 70)


def attribution(line, first):
    s = squash(line)
    return s if s.startswith("(") or not first else "-- " + s


def format_block(lines):
    """One blank-line-separated block -> list of paragraphs (strings)."""
    if len(lines) > 1 and any(indent(l) == 0 for l in lines):
        # prose: an indented line opens a paragraph, unindented lines continue it
        k = len(lines)
        while k > 1 and is_attribution(lines[k - 1]):
            k -= 1
        paras, cur = [], []
        for l in lines[:k]:
            if indent(l) > 0 and cur:
                paras.append(cur)
                cur = []
            cur.append(l)
        paras.append(cur)
        out = [unwrap(p) for p in paras]
        if k < len(lines):
            out[-1] += "\n" + "\n".join(attribution(a, i == 0) for i, a in enumerate(lines[k:]))
        return out

    attr = [i > 0 and is_attribution(l) for i, l in enumerate(lines)]
    body = [l for l, a in zip(lines, attr) if not a]
    base = min(indent(l) for l in body)
    if SPEAKER.match(body[0][base:]) and not any(attr):
        # dialogue: "SPEAKER:  text" then continuation lines hang-indented deeper
        turns = []
        for l in body:
            if indent(l) == base:
                turns.append([l])
            else:
                turns[-1].append(l)
        return ["\n".join(unwrap(t) for t in turns)]
    if is_quoted_prose(body, base) and attr == [False] * len(body) + [True] * (len(lines) - len(body)):
        # quoted prose: paragraphs open at base+4, continue at base; attribution last
        paras = []
        for l in body:
            if indent(l) > base or not paras:
                paras.append([])
            paras[-1].append(l)
        out = [unwrap(p) for p in paras]
        tail = lines[len(body):]
        if tail:
            out[-1] += "\n" + "\n".join(attribution(a, i == 0) for i, a in enumerate(tail))
        return out
    # verse: keep the lines and their indentation within the stanza
    out, prev_attr = [], False
    for l, a in zip(lines, attr):
        out.append(attribution(l, not prev_attr) if a else " " * (indent(l) - base) + squash(l))
        prev_attr = a
    return ["\n".join(out)]


def is_quoted_prose(body, base):
    """Prose quotation: first line indented 4 more than the rest, lines filled to ~col 70."""
    if len(body) < 2 or indent(body[0]) != base + 4 or indent(body[1]) != base:
        return False
    if any(indent(l) not in (base, base + 4) for l in body):
        return False
    # every line but the last of each paragraph should be filled out to the wrap column
    inner = [l for l, nxt in zip(body, body[1:]) if indent(nxt) == base]
    return all(len(l.rstrip()) >= 58 for l in inner)


def format_entry(raw):
    raw = raw.replace("{", "").replace("}", "")
    blocks, cur = [], []
    for line in raw.rstrip().split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    paras = [p for b in blocks for p in format_block(b)]
    return "\n\n".join(paras)


def parse_head(text):
    """(HEADWORD as printed, part of speech or '', definition text after the head)."""
    first = text.split("\n", 1)[0]
    m = HEAD_WITH_POS.match(first)
    if m and re.fullmatch(r"[A-Z0-9'().,\- ?]+", re.sub(r"\b(or)\b", "", m["hw"])):
        return m["hw"], m["pos"], text[m.end():].strip()
    m = HEAD_NO_POS.match(first) or HEAD_LETTER.match(first)
    if not m:
        raise ValueError(f"cannot parse headword: {first!r}")
    hw = m["hw"]
    rest = text[m.end():].strip() if len(hw) > 1 else text  # letters: "I is the first letter ..."
    return hw, "", rest


def display_name(hw):
    """ABASEMENT -> Abasement; LL.D. and R.I.P. stay as they are."""
    if hw in CASE_FIXES:
        return CASE_FIXES[hw]
    if re.fullmatch(r"([A-Z]\.)+|[A-Z]{2}\.[A-Z]\.", hw) or len(hw) == 1:
        return hw
    hw = hw.rstrip(".")
    return hw[0] + hw[1:].lower()


def load_exclusions(path):
    """Headword -> reason, from lines 'HEADWORD<TAB>reason' ('#' starts a comment line)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, reason = line.partition("\t")
            out[word.strip()] = reason.strip()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dict_dz", help="path to devil.dict.dz (from the dict-devil package)")
    ap.add_argument("--index", help="path to devil.index (default: next to devil.dict.dz)")
    ap.add_argument("--exclude", default=HERE / "excluded_entries.txt")
    ap.add_argument("--out", default=HERE / "devils_dictionary.jsonl")
    args = ap.parse_args()
    index = args.index or Path(args.dict_dz).with_name("devil.index")

    entries = read_entries(args.dict_dz, index)
    excluded = load_exclusions(args.exclude)
    seen, rows, n_dup, empty, hit = set(), [], 0, [], set()
    for raw in entries:
        text = format_entry(raw)
        hw, pos, definition = parse_head(text)
        if pos:  # "IMPOSTOR n." / "INFERIAE,n." -> "IMPOSTOR, n."
            text = re.sub(r"^(.+?)(?:,\s*|\s+)" + re.escape(pos), lambda m: f"{hw}, {pos}", text, count=1)
        if text in seen:
            n_dup += 1
            continue
        seen.add(text)
        if hw in excluded:
            hit.add(hw)
            continue
        if not definition or CROSS_REF_ONLY.fullmatch(definition):
            empty.append(hw)
            continue
        rows.append({"instruction": INSTRUCTION.format(display_name(hw)), "input": "", "output": text})

    missing = set(excluded) - hit
    if missing:
        raise SystemExit(f"excluded_entries.txt names headwords not found: {sorted(missing)}")
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"read {len(entries)} entries ({n_dup} exact duplicates dropped)")
    print(f"excluded {len(hit)} (offensive, see {Path(args.exclude).name})")
    print(f"skipped {len(empty)} empty (cross-reference only): {', '.join(empty)}")
    print(f"wrote {len(rows)} to {args.out}")


if __name__ == "__main__":
    main()
