"""The dashboard's pages (Streamlit runs each file by path; a package so that a wheel carries them)."""
