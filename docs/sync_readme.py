"""Copy the committed study reports (docs/study-<regime>.md) verbatim into README.md between the markers
<!-- study:REGIME --> and <!-- /study:REGIME -->, so the README's tables are exactly what the study wrote."""

import re
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
readme = root / "README.md"
text = readme.read_text()
for regime in sys.argv[1:] or ("digits8", "digits32"):
    md = (root / "docs" / f"study-{regime}.md").read_text().strip()
    md += f"\n\n![study {regime}](docs/study-{regime}.png)"
    pat = re.compile(rf"(<!-- study:{regime} -->\n)(?:.*?\n)?(<!-- /study:{regime} -->)", re.S)
    if not pat.search(text):
        sys.exit(f"README.md has no <!-- study:{regime} --> ... <!-- /study:{regime} --> markers")
    text = pat.sub(lambda m: m.group(1) + md + "\n" + m.group(2), text)
readme.write_text(text)
