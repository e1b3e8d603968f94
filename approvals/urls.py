from django.urls import path

from approvals import views

app_name = "approvals"
urlpatterns = [
    path("", views.inbox, name="inbox"),
    path("count/", views.inbox_count, name="count"),
    path("bulk-approve/", views.bulk_approve, name="bulk_approve"),
    path("<int:approval_id>/decide/", views.decide, name="decide"),
    path("<int:approval_id>/reassign/", views.reassign, name="reassign"),
]
