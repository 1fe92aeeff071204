"""Output capture for mtpo.agent.sandbox: keep the head and tail of a cell's output, state the cut.

The parent reads the session's stdout/stderr pipe while the cell runs; `_Capture` holds at most
2 x `limit` bytes whatever the cell prints, cut at UTF-8 character boundaries, and counts the
characters it dropped, so the note "[... N characters cut ...]" is exact.
"""

from __future__ import annotations

_UTF8_CONTINUATION = bytes(range(0x80, 0xC0))


def complete_prefix(buf: bytearray) -> int:
    """Length of the longest prefix of `buf` that does not end inside a UTF-8 character."""
    start = len(buf) - 1
    while start > 0 and len(buf) - start < 4 and 0x80 <= buf[start] < 0xC0:
        start -= 1
    if start < 0:
        return 0
    lead = buf[start]
    need = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return len(buf) if len(buf) - start >= need else start


class Capture:
    """Keeps the first and last `limit` bytes of a stream and counts the characters in between."""

    def __init__(self, limit: int):
        self.limit, self.head, self.tail = limit, bytearray(), bytearray()
        self.head_full, self.dropped_chars = False, 0

    def feed(self, data: bytes) -> None:
        if not self.head_full:
            room = self.limit - len(self.head)
            self.head += data[:room]
            data = data[room:]
            if len(self.head) >= self.limit:  # a character split at the edge moves to the tail
                self.head_full = True
                keep = complete_prefix(self.head)
                data = bytes(self.head[keep:]) + data
                del self.head[keep:]
        self.tail += data
        excess = len(self.tail) - self.limit
        if excess > 0:
            while excess < len(self.tail) and 0x80 <= self.tail[excess] < 0xC0:
                excess += 1  # never start the tail inside a character
            # characters = bytes that are not UTF-8 continuation bytes
            self.dropped_chars += len(bytes(self.tail[:excess]).translate(None, _UTF8_CONTINUATION))
            del self.tail[:excess]

    def ends_with_newline(self) -> bool:
        last = self.tail or self.head
        return not last or last.endswith(b"\n")

    def text(self, max_bytes: int = 4096) -> str:
        return bytes(self.head[:max_bytes]).decode("utf-8", "replace")

    @staticmethod
    def cut(text: str, max_chars: int) -> str:
        """`text` cut to `max_chars` characters like `render` does (head and tail halves kept)."""
        capture = Capture(4 * max_chars + 4096)
        capture.feed(text.encode("utf-8", "surrogatepass"))
        return capture.render("", max_chars)

    def render(self, suffix: str, max_chars: int) -> str:
        """The captured text + `suffix`, cut to `max_chars` characters (head and tail halves kept)."""
        keep_head = max_chars // 2
        keep_tail = max_chars - keep_head
        if not self.dropped_chars:
            text = (self.head + self.tail).decode("utf-8", "replace") + suffix
            if len(text) <= max_chars:
                return text
            head, tail, cut = text[:keep_head], text[len(text) - keep_tail:], len(text) - max_chars
        else:
            head_text = self.head.decode("utf-8", "replace")
            tail_text = self.tail.decode("utf-8", "replace") + suffix
            head, tail = head_text[:keep_head], tail_text[-keep_tail:]
            cut = len(head_text) - len(head) + self.dropped_chars + len(tail_text) - len(tail)
        return f"{head}\n[... {cut} characters cut ...]\n{tail}"
