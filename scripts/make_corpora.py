"""Regenerates the bundled plain-text corpora in ``jaxprune/data/texts/`` from installed packages.

- ``wiki`` (calibration): the ~100 English Wikipedia articles in the test data of the ``gensim`` wheel
  (``pip install --no-deps gensim``; gensim itself is never imported), markup stripped, WikiText-style headings.
- ``austen`` (evaluation): Jane Austen's six novels from the Debian package ``r-cran-janeaustenr``
  (``apt-get install r-cran-janeaustenr``, or ``apt-get download`` + ``dpkg -x DEB DIR`` and ``--rlib DIR``),
  read with the PyPI package ``rdata``.
- ``mobydick`` (optional): Moby Dick from the Debian package ``r-cran-tokenizers``, Gutenberg header and
  licence stripped.

Writes ``NAME.txt.xz`` and ``LICENSES.md`` and prints the sha256 of each plain text (UTF-8 bytes)::

  python scripts/make_corpora.py [--out jaxprune/data/texts] [--rlib DIR ...] [--only wiki,austen]
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import html
import importlib.util
import lzma
import re
import sys
import warnings
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

GENSIM_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
R_LIBS = ("/usr/lib/R/site-library", "/usr/lib/R/library", "/usr/local/lib/R/site-library")
# The order of janeaustenr::austen_books().
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
# Sections from which on an article is only apparatus.
STOP_SECTIONS = {"see also", "references", "external links", "further reading", "notes", "bibliography",
                 "sources", "footnotes", "citations", "notes and references"}
DISAMBIGUATION = re.compile(r"\{\{\s*(disambiguation|disambig|geodis|hndis|dab)\b", re.I)
DROPPED_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|source|syntaxhighlight|score|imagemap)\b[^>]*>.*?</\1\s*>", re.S | re.I)
INLINE_TAGS = re.compile(r"</?(br|small|sup|sub|span|center|blockquote|poem|code|nowiki|references)\b[^>]*>", re.I)


# ---------------------------------------------------------------------------------------------- wiki


def gensim_dump() -> Path:
  """The bz2 MediaWiki dump in the installed gensim wheel (located without importing gensim)."""
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    sys.exit("gensim is not installed: pip install --no-deps gensim==4.4.0")
  path = Path(list(spec.submodule_search_locations)[0]) / GENSIM_DUMP
  if not path.is_file():
    sys.exit(f"{path} is missing from the gensim wheel")
  return path


def strip_nested(text: str, opening: str, closing: str) -> str:
  """Removes balanced ``opening ... closing`` spans, nested ones included (templates, tables)."""
  out, depth, i = [], 0, 0
  while i < len(text):
    if text.startswith(opening, i):
      depth, i = depth + 1, i + len(opening)
    elif depth and text.startswith(closing, i):
      depth, i = depth - 1, i + len(closing)
    else:
      if not depth:
        out.append(text[i])
      i += 1
  return "".join(out)


def strip_files(text: str) -> str:
  """Removes ``[[File:...]]`` and ``[[Image:...]]`` links with their captions (nested links included)."""
  out, i = [], 0
  opening = re.compile(r"\[\[\s*(File|Image)\s*:", re.I)
  while (m := opening.search(text, i)) is not None:
    out.append(text[i:m.start()])
    depth, j = 0, m.start()
    while j < len(text):
      if text.startswith("[[", j):
        depth, j = depth + 1, j + 2
      elif text.startswith("]]", j):
        depth, j = depth - 1, j + 2
        if depth == 0:
          break
      else:
        j += 1
    i = j
  out.append(text[i:])
  return "".join(out)


def strip_markup(text: str) -> str:
  """Wiki markup -> plain lines: comments, templates, tables, references, files, links, quotes, tags."""
  text = re.sub(r"<!--.*?-->", "", text)
  text = re.sub(r"<!--[^\n]*", "", text)  # an unclosed comment ends at the end of its line
  text = DROPPED_ELEMENTS.sub("", text)
  text = strip_nested(text, "{{", "}}")
  text = strip_nested(text, "{|", "|}")
  text = re.sub(r"<ref[^>]*/>", "", text)
  text = re.sub(r"<ref(?:\s[^>]*)?>.*?</ref>", "", text, flags=re.S)
  text = strip_files(text)
  text = re.sub(r"\[\[Category:[^\]]*\]\]", "", text)
  text = re.sub(r"\[\[[a-z][a-z-]*:[^\]]*\]\]", "", text)  # interlanguage links
  for _ in range(3):
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)
  text = re.sub(r"\[(?:https?|ftp)?:?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)
  text = re.sub(r"'{2,}", "", text)
  text = INLINE_TAGS.sub("", text)
  return html.unescape(text)


def article_lines(title: str, markup: str) -> list[str]:
  """WikiText-style lines of one article: `` = Title = ``, `` = = Section = = ``, one line per paragraph."""
  lines = ["", f" = {title} = ", ""]
  for line in strip_markup(markup).split("\n"):
    line = line.strip()
    heading = re.match(r"^(={2,})\s*(.*?)\s*\1$", line)
    if heading:
      name = heading.group(2)
      if name.lower() in STOP_SECTIONS:
        break
      marks = " ".join("=" * len(heading.group(1)))
      if lines[-1]:
        lines.append("")
      lines += [f" {marks} {name} {marks} ", ""]
      continue
    line = re.sub(r"\s+", " ", re.sub(r"^[*#:;]+\s*", "", line)).strip()
    if line:
      lines.append(f" {line} ")
  return lines


def wiki_articles(dump: Path) -> list[tuple[str, str]]:
  """``(title, markup)`` of the main-namespace articles, without redirects and disambiguation pages."""
  root = ET.fromstring(bz2.decompress(dump.read_bytes()))
  ns = root.tag[:root.tag.index("}") + 1]
  out = []
  for page in root.iter(ns + "page"):
    if page.findtext(ns + "ns") != "0" or page.find(ns + "redirect") is not None:
      continue
    markup = page.findtext(f"{ns}revision/{ns}text") or ""
    if not DISAMBIGUATION.search(markup):
      out.append((page.findtext(ns + "title"), markup))
  return out


def make_wiki() -> str:
  """The plain text of all articles, each starting with a blank line and its `` = Title = `` line."""
  lines = []
  for title, markup in wiki_articles(gensim_dump()):
    lines += article_lines(title, markup)
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------ R data


def r_package_data(package: str, rlibs: list[str]) -> Path:
  """The ``data/`` directory of an installed (or ``dpkg -x``-extracted) R package."""
  for lib in rlibs:
    for base in (Path(lib), Path(lib) / "usr/lib/R/site-library"):
      if (base / package / "data" / "Rdata.rdx").is_file():
        return base / package / "data"
  sys.exit(f"R package {package} not found under {rlibs}: apt-get install r-cran-{package} "
           f"(or apt-get download + dpkg -x DEB DIR, then --rlib DIR)")


def read_rdata(data_dir: Path) -> dict:
  """All objects of an R lazy-load database (``Rdata.rdx`` index + ``Rdata.rdb`` blobs), via ``rdata``."""
  import rdata  # only this script needs it

  def parse(raw: bytes):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return rdata.conversion.convert(rdata.parser.parse_data(raw))

  index = parse(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
  rdb = (data_dir / "Rdata.rdb").read_bytes()
  out = {}
  for name, (offset, length) in index["variables"].items():
    blob = rdb[int(offset):int(offset) + int(length)]  # 4-byte big-endian size, then zlib data
    raw = zlib.decompress(blob[4:])
    assert len(raw) == int.from_bytes(blob[:4], "big"), name
    out[str(name)] = parse(raw)
  return out


def make_austen(rlibs: list[str]) -> str:
  """The six novels in ``austen_books()`` order; every line ends with a newline, two blank lines after a book."""
  books = read_rdata(r_package_data("janeaustenr", rlibs))
  return "".join("".join(f"{line}\n" for line in map(str, books[name])) + "\n\n" for name in AUSTEN_BOOKS)


def make_mobydick(rlibs: list[str]) -> str:
  """Moby Dick without the Project Gutenberg header, licence and BOM, with Unix newlines."""
  (text,) = read_rdata(r_package_data("tokenizers", rlibs))["mobydick"]
  text = str(text).lstrip("\ufeff").replace("\r\n", "\n")
  start = re.search(r"^\*\*\* ?START OF TH(IS|E) PROJECT GUTENBERG EBOOK.*$", text, re.M | re.I)
  end = re.search(r"^\*\*\* ?END OF TH(IS|E) PROJECT GUTENBERG EBOOK", text, re.M | re.I)
  if start is None or end is None:
    sys.exit("mobydick: Project Gutenberg start/end markers not found")
  return text[start.end():end.start()].strip("\n") + "\n"


# ---------------------------------------------------------------------------------------- licences


def licenses(out: Path) -> str:
  """``LICENSES.md`` for the corpora present in ``out`` (wiki article titles read back from ``wiki.txt.xz``)."""
  present = {p.name.split(".")[0] for p in out.glob("*.txt.xz")}
  titles = None
  if "wiki" in present:
    wiki = lzma.decompress((out / "wiki.txt.xz").read_bytes()).decode("utf-8")
    titles = re.findall(r"^ = ([^=\n]+) = $", wiki, re.M)
  parts = ["# Bundled texts: sources and licences\n",
           "Regenerate with `python scripts/make_corpora.py`. Each `NAME.txt.xz` is an xz-compressed UTF-8 text.\n"]
  if titles is not None:
    parts.append(
        "## wiki.txt.xz\n\n"
        "Text of English Wikipedia articles by Wikipedia contributors, licensed under the Creative Commons\n"
        "Attribution-ShareAlike 3.0 Unported License (CC BY-SA 3.0,\n"
        "https://creativecommons.org/licenses/by-sa/3.0/), the licence of Wikipedia text at the time of the\n"
        "2016 revisions used. The authors are listed in each article's history on https://en.wikipedia.org.\n"
        "Source: the dump sample shipped as test data in the gensim 4.4.0 wheel\n"
        f"(`gensim/{GENSIM_DUMP}`).\n"
        "Changes: wiki markup, tables, templates, references, images, redirect and disambiguation pages, and\n"
        "the sections from 'See also' on were removed; headings rewritten WikiText-style. This adapted text is\n"
        "distributed under the same licence (CC BY-SA 3.0).\n\nArticles, in order:\n\n"
        + "".join(f"- {t}\n" for t in titles))
  if "austen" in present:
    parts.append(
        "## austen.txt.xz\n\n"
        "Jane Austen, *Sense and Sensibility*, *Pride and Prejudice*, *Mansfield Park*, *Emma*,\n"
        "*Northanger Abbey*, *Persuasion* (1811-1818): public domain. Transcriptions from Project Gutenberg\n"
        "as packaged by the R package janeaustenr 1.0.0 (Julia Silge, MIT licence; Debian `r-cran-janeaustenr`).\n")
  if "mobydick" in present:
    parts.append(
        "## mobydick.txt.xz\n\n"
        "Herman Melville, *Moby Dick; or The Whale* (1851): public domain. Transcription from Project\n"
        "Gutenberg as packaged by the R package tokenizers (MIT licence; Debian `r-cran-tokenizers`),\n"
        "without the Project Gutenberg header and licence.\n")
  return "\n".join(parts)


def write_xz(out: Path, name: str, text: str) -> None:
  data = text.encode("utf-8")
  (out / f"{name}.txt.xz").write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
  size = (out / f"{name}.txt.xz").stat().st_size
  print(f"{name}: {len(text):,} chars, sha256 {hashlib.sha256(data).hexdigest()}, {size:,} bytes compressed")


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "jaxprune/data/texts")
  p.add_argument("--rlib", action="append", default=[], help="extra R library dir or dpkg -x root (repeatable)")
  p.add_argument("--only", default="wiki,austen,mobydick", help="comma-separated corpora to make")
  args = p.parse_args(argv)
  names = [n for n in args.only.split(",") if n]
  unknown = set(names) - {"wiki", "austen", "mobydick"}
  if unknown:
    p.error(f"unknown corpora {sorted(unknown)}")
  rlibs = [*args.rlib, *R_LIBS]
  args.out.mkdir(parents=True, exist_ok=True)
  if "wiki" in names:
    write_xz(args.out, "wiki", make_wiki())
  if "austen" in names:
    write_xz(args.out, "austen", make_austen(rlibs))
  if "mobydick" in names:
    write_xz(args.out, "mobydick", make_mobydick(rlibs))
  (args.out / "LICENSES.md").write_text(licenses(args.out))
  print(f"wrote {args.out}/LICENSES.md")


if __name__ == "__main__":
  main()
