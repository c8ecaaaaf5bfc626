"use strict";
// A small Markdown renderer for replies that builds DOM nodes and never parses HTML: text goes into the
// page only as Text nodes (textContent), so markup in model text is shown, never run. It knows what chat
// replies use: fenced code blocks (``` with an optional language), inline `code`, **bold**, *italic*,
// headings, bullet and numbered lists, paragraphs, and links whose target is http(s) only.
// An unclosed code fence (a reply still streaming) renders as a code block to the end.
(() => {
  const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*\d+[.)]\s+(.*)$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  // One inline construct at a time, leftmost first: code, bold, italic, link.
  const INLINE = /`([^`\n]+)`|\*\*([^*\n]+)\*\*|\*([^*\s][^*\n]*)\*|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/;

  function element(tag, children) {
    const node = document.createElement(tag);
    node.append(...children);
    return node;
  }

  function inline(text) {
    const out = [];
    let rest = text;
    for (let match = INLINE.exec(rest); match; match = INLINE.exec(rest)) {
      if (match.index > 0) out.push(rest.slice(0, match.index));
      const [whole, code, bold, italic, label, href] = match;
      if (code !== undefined) out.push(element("code", [code]));
      else if (bold !== undefined) out.push(element("strong", inline(bold)));
      else if (italic !== undefined) out.push(element("em", inline(italic)));
      else {
        const link = element("a", [label]);
        link.href = href; // http(s) only, by the pattern: no javascript: or data: targets
        link.rel = "noopener noreferrer nofollow";
        link.target = "_blank";
        out.push(link);
      }
      rest = rest.slice(match.index + whole.length);
    }
    if (rest) out.push(rest);
    return out; // strings become Text nodes in append()
  }

  function codeBlock(lines, start, language) {
    const body = [];
    let i = start;
    while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) body.push(lines[i++]);
    const code = element("code", [body.join("\n")]);
    if (language) code.dataset.language = language;
    return [element("pre", [code]), i + 1];
  }

  function list(lines, start, pattern, tag) {
    const items = [];
    let i = start;
    for (let m = pattern.exec(lines[i] ?? ""); i < lines.length && m; m = pattern.exec(lines[++i] ?? "")) {
      items.push(element("li", inline(m[1])));
    }
    return [element(tag, items), i];
  }

  function paragraph(lines, start) {
    const parts = [];
    let i = start;
    while (i < lines.length && lines[i].trim() && !isBlockStart(lines[i])) {
      if (parts.length) parts.push(document.createElement("br"));
      parts.push(...inline(lines[i++]));
    }
    return [element("p", parts), i];
  }

  function isBlockStart(line) {
    return FENCE.test(line) || BULLET.test(line) || NUMBERED.test(line) || HEADING.test(line);
  }

  function renderMarkdown(text) {
    const fragment = document.createDocumentFragment();
    const lines = text.split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let block;
      const fence = FENCE.exec(line);
      const heading = HEADING.exec(line);
      if (fence) [block, i] = codeBlock(lines, i + 1, fence[1]);
      else if (BULLET.test(line)) [block, i] = list(lines, i, BULLET, "ul");
      else if (NUMBERED.test(line)) [block, i] = list(lines, i, NUMBERED, "ol");
      else if (heading) {
        block = element("p", [element("strong", inline(heading[2]))]);
        block.className = "heading";
        i += 1;
      } else if (!line.trim()) {
        i += 1;
        continue;
      } else [block, i] = paragraph(lines, i);
      fragment.append(block);
    }
    return fragment;
  }

  window.renderMarkdown = renderMarkdown;
})();
