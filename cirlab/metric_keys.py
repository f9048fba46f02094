"""How results keys name the ranking metrics, for the commands that read results.json (leaderboard, plot)."""

from __future__ import annotations

import re

# recall@K or mAP@K of a split, `<split>/<metric>_at_K`, or its mean over a grouped benchmark's groups
# (FashionIQ's categories), `<split>/average/<metric>_at_K`
AT_K = re.compile(r"^(?P<split>[^/]+)/(?P<average>average/)?(?P<kind>recall|map)_at_(?P<k>\d+)$")
