// Terminal column width for yargs' help layout, standing in for string-width in the bundled CLI.
//
// string-width builds an Intl.Segmenter and compiles Unicode-set regexes when it is imported, which
// cost every portflip command about 80 ms before any work (measured here: importing string-width
// alone, beside `node -e 0`). The help text is ASCII; for anything else this is the classic wcwidth
// rule: combining marks and zero-width code points take no column, East Asian wide and emoji ranges
// take two.

// eslint-disable-next-line no-control-regex
const ANSI = /\x1b\[[0-9;]*[A-Za-z]|\x1b\]8;;.*?\x07/g;

const ZERO: [number, number][] = [
  [0x0300, 0x036f],
  [0x200b, 0x200f],
  [0x20d0, 0x20ff],
  [0xfe00, 0xfe0f],
  [0xfe20, 0xfe2f],
];
const WIDE: [number, number][] = [
  [0x1100, 0x115f],
  [0x2e80, 0x303e],
  [0x3041, 0x33ff],
  [0x3400, 0x4dbf],
  [0x4e00, 0x9fff],
  [0xa000, 0xa4cf],
  [0xac00, 0xd7a3],
  [0xf900, 0xfaff],
  [0xfe30, 0xfe4f],
  [0xff00, 0xff60],
  [0xffe0, 0xffe6],
  [0x1f300, 0x1f64f],
  [0x1f900, 0x1f9ff],
  [0x20000, 0x3fffd],
];
const within = (ranges: [number, number][], cp: number) => ranges.some(([lo, hi]) => cp >= lo && cp <= hi);

export default function textWidth(text: string): number {
  const plain = String(text).replace(ANSI, '');
  if (/^[\x20-\x7e]*$/.test(plain)) return plain.length;
  let width = 0;
  for (const ch of plain) {
    const cp = ch.codePointAt(0)!;
    if (cp < 0x20 || (cp >= 0x7f && cp < 0xa0) || within(ZERO, cp)) continue;
    width += within(WIDE, cp) ? 2 : 1;
  }
  return width;
}
