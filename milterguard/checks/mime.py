"""Checks of the MIME structure, the HTML and the attachments."""

from __future__ import annotations

import re

from milterguard.checks.registry import check
from milterguard.mail.defects import DEFECTS
from milterguard.model import Hits, Stage

# Defects the message parser reports, each its own symbol.
DEFECT_SYMBOLS = tuple(sorted(DEFECTS))

_FAREAST = re.compile(r"^(?:gb2312|gbk|gb18030|big5|ks_c_5601.*|euc-kr|euc-jp|iso-2022-jp|iso-2022-kr|shift_jis|hz-gb-2312)$")
_IMG = re.compile(r"<img\b", re.I)


@check(stage=Stage.EOM, emits=DEFECT_SYMBOLS, priority=10)
def mime_defects(scan, hits: Hits) -> None:
    """Report what the parser found broken in the message."""
    for defect in scan.message.defects:
        if defect in DEFECT_SYMBOLS:
            hits.add(defect, where="MIME structure")


@check(stage=Stage.EOM, emits=("MIME_HTML_ONLY", "HTML_IMAGE_ONLY", "HTML_SHORT_WITH_LINK", "MIME_CHARSET_FAREAST",
                               "BODY_EMPTY"), priority=20)
def mime_shape(scan, hits: Hits) -> None:
    """The overall shape of the message: HTML without text, images without words."""
    msg = scan.message
    texts = [p for p in msg.parts if p.text is not None and not p.is_attachment]
    html_parts = [p for p in texts if p.is_html]
    plain_parts = [p for p in texts if not p.is_html]
    if html_parts and not plain_parts:
        hits.add("MIME_HTML_ONLY", where="MIME structure")
    words = len(msg.text.split())
    if html_parts:
        images = sum(len(_IMG.findall(p.text or "")) for p in html_parts)
        if images and words < 40:
            hits.add("HTML_IMAGE_ONLY", f"{images} images, {words} words", where="HTML")
        elif msg.urls and words < 25:
            hits.add("HTML_SHORT_WITH_LINK", f"{words} words", where="HTML")
    if not words and not msg.attachments:
        hits.add("BODY_EMPTY", where="body")
    for part in texts:
        if _FAREAST.match(part.charset or ""):
            hits.add("MIME_CHARSET_FAREAST", part.charset, where="MIME charset")
            break
    subj_charsets = re.findall(r"=\?([^?]+)\?", " ".join(msg.header_raw("Subject")))
    if any(_FAREAST.match(c.lower()) for c in subj_charsets):
        hits.add("MIME_CHARSET_FAREAST", subj_charsets[0].lower(), where="header Subject")


@check(stage=Stage.EOM, emits=("MIME_EXEC_ATTACHMENT", "MIME_DOUBLE_EXT", "MIME_ATTACH_OFFICE_MACRO"), priority=20)
def attachment_names(scan, hits: Hits) -> None:
    """Executable and macro-enabled attachments, and names that hide their real extension.

    The extension lists are settings (attachments.*); names inside archives are
    judged by the `archive_contents` check with the same lists.
    """
    policy = name_policy(scan.config)
    for part in scan.message.attachments:
        name = (part.filename or "").strip().lower()
        if not name:
            continue
        for symbol in policy.judge(name):
            hits.add(symbol, name, where="attachment name", text=name)


class NamePolicy:
    """The attachment name lists of one configuration."""

    def __init__(self, dangerous, macro, cover) -> None:
        self.dangerous = frozenset(e.lower().lstrip(".") for e in dangerous)
        self.macro = frozenset(e.lower().lstrip(".") for e in macro)
        self.cover = frozenset(e.lower().lstrip(".") for e in cover)

    def judge(self, name: str) -> list[str]:
        """The symbols NAME (lower case) earns: executable, macro, double extension."""
        out = []
        stem, dot, ext = name.rstrip(" .").rpartition(".")
        if not dot:
            return out
        if ext in self.dangerous:
            out.append("MIME_EXEC_ATTACHMENT")
            # invoice.pdf.exe, invoice.pdf   .exe: a cover extension right before the real one.
            inner = stem.rstrip().rpartition(".")[2] if "." in stem else ""
            if inner in self.cover:
                out.append("MIME_DOUBLE_EXT")
        elif ext in self.macro:
            out.append("MIME_ATTACH_OFFICE_MACRO")
        return out


_POLICIES: dict[tuple, NamePolicy] = {}


def name_policy(config) -> NamePolicy:
    """The NamePolicy of CONFIG's lists, built once per distinct set of lists."""
    key = tuple(tuple(config[f"attachments.{kind}_extensions"]) for kind in ("dangerous", "macro", "cover"))
    policy = _POLICIES.get(key)
    if policy is None:
        if len(_POLICIES) > 8:
            _POLICIES.clear()
        policy = _POLICIES[key] = NamePolicy(*key)
    return policy
