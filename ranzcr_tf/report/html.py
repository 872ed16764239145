"""The report page: one self-contained HTML file, every figure inlined as a base64 PNG, no external
stylesheet, font or script (it opens offline, from a USB stick or a Kaggle output folder).

    page = Page("run report")
    page.section("Data", table(["fold", "studies"], rows), "<p>...</p>")
    io_utils.atomic_write_text("report/index.html", page.render())

The one inline script only counts images that failed to load and writes the count on ``<body>``
(``data-images``, ``data-broken-images``), so a headless browser can check the page without a
debugging protocol.
"""

from __future__ import annotations

import base64
import datetime
import html

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto; max-width: 1250px;
       color: #222; line-height: 1.35; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; }
td.best { font-weight: bold; background: #eaf6ea; }
img { max-width: 100%; } img.thumb { width: 96px; height: 96px; image-rendering: auto; }
p.note { color: #555; font-size: 0.9em; } nav a { margin-right: 0.8em; }
div.grid { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; }
div.grid img { width: calc(33% - 6px); }
"""

SCRIPT = """
window.addEventListener("load", function () {
  var images = document.images, broken = 0;
  for (var i = 0; i < images.length; i++) {
    if (!images[i].complete || images[i].naturalWidth === 0) { broken += 1; }
  }
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken));
});
"""


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def image(png: bytes, alt: str, css_class: str = "") -> str:
    """An ``<img>`` holding ``png`` inline."""
    data = base64.b64encode(png).decode("ascii")
    klass = f' class="{css_class}"' if css_class else ""
    return f'<img{klass} alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list, rows: list[list], name_columns: int = 1) -> str:
    """A table; the first ``name_columns`` columns left-aligned. Cells are escaped unless given as
    ``Raw`` (an image, a highlighted cell)."""

    def cell(tag: str, value, index: int) -> str:
        css = ' class="name"' if index < name_columns else ""
        if isinstance(value, Raw):
            return f"<{tag}{value.attributes or css}>{value.html}</{tag}>"
        return f"<{tag}{css}>{escape(value)}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class Raw:
    """Table cell content already in HTML (``attributes``: e.g. ``' class="best"'``)."""

    def __init__(self, html_text: str, attributes: str = ""):
        self.html, self.attributes = html_text, attributes


class Page:
    """Sections in order, rendered with a table of contents."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str]] = []

    def section(self, heading: str, *parts: str) -> None:
        anchor = f"s{len(self.sections) + 1}"
        self.sections.append((anchor, heading, "\n".join(parts)))

    def render(self) -> str:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        nav = " ".join(f'<a href="#{a}">{escape(h)}</a>' for a, h, _ in self.sections)
        body = "\n".join(f'<h2 id="{a}">{escape(h)}</h2>\n{content}' for a, h, content in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{escape(self.title)}</title><style>{STYLE}</style><script>{SCRIPT}</script></head>\n"
                f"<body><h1>{escape(self.title)}</h1><p class=\"note\">{escape(self.subtitle)} "
                f"(written {stamp} by python -m ranzcr_tf.report)</p><nav>{nav}</nav>\n{body}\n</body></html>\n")
