"""The Streamlit dashboard: a thin shell over the library (``streamlit run dashboard/app.py``)."""
