"""Drawing only: charts, notebook widgets and the HTML report; nothing here computes a figure."""
