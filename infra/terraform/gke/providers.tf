# No credentials here. The provider authenticates from the environment:
# Application Default Credentials (`gcloud auth application-default login` on a workstation,
# GOOGLE_APPLICATION_CREDENTIALS or workload identity federation in CI).
provider "google" {
  project = var.project
  region  = var.region
}
