"""The dashboard: `streamlit run dashboard/app.py` (same PERSONALIZE_* settings as the CLI).

Researchers read and present the comparison (Comparison, By data volume, Cost); engineers run the platform
(Router, Users, Jobs). Each page is a module under ``dashboard/pages_/`` that reads through ``dashboard.data``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

HERE = Path(__file__).resolve().parent

PAGES = {
    "Research": [
        st.Page(HERE / "pages_" / "comparison.py", title="Comparison", icon=":material/table_chart:", default=True),
        st.Page(HERE / "pages_" / "volume.py", title="By data volume", icon=":material/show_chart:", url_path="volume"),
        st.Page(HERE / "pages_" / "cost.py", title="Cost", icon=":material/payments:", url_path="cost"),
    ],
    "Platform": [
        st.Page(HERE / "pages_" / "router.py", title="Router", icon=":material/alt_route:", url_path="router"),
        st.Page(HERE / "pages_" / "users.py", title="Users", icon=":material/person:", url_path="users"),
        st.Page(HERE / "pages_" / "jobs.py", title="Jobs", icon=":material/work_history:", url_path="jobs"),
    ],
}

st.set_page_config(page_title="personalize", page_icon=":material/tune:", layout="wide")
st.navigation(PAGES).run()
