from django.urls import path

from lineage import views

app_name = "lineage"
urlpatterns = [
    path("", views.run_lineage, name="run"),
    path("verify/", views.run_lineage_verify, name="verify"),
    path("export/", views.run_lineage_export, name="export"),
    # Every trail's events in a period: offered on each trail's page, so it lives under
    # one (the run in its URL only says which page the form was on).
    path("export/period/", views.period_export, name="period_export"),
]
