# GPU and CPU node pools for an existing GKE Standard cluster.
#
# Contract with our manifests (serving/manifests.py, infra/serving, Trainer runtimes):
#   - GPU nodes carry the taint nvidia.com/gpu=present:NoSchedule, so only pods that tolerate
#     nvidia.com/gpu (InferenceServices, TrainJobs, GPU operator daemonsets) land there;
#   - GPU nodes carry the label onevision/pool=gpu, which GPU workloads select;
#   - nvidia.com/gpu.present=true is the label the GPU operator itself puts on GPU nodes; setting it
#     here puts it in the autoscaler's node template too, so pods selecting it can scale the pool
#     up from zero.

locals {
  gpu_node_labels = {
    "onevision/pool"         = "gpu"
    "nvidia.com/gpu.present" = "true"
    # GKE runs its own NVIDIA device plugin on GPU nodes unless told not to; the GPU operator's
    # device plugin advertises nvidia.com/gpu instead (two plugins would fight over the resource).
    "gke-no-default-nvidia-gpu-device-plugin" = "true"
  }

  system_node_labels = {
    "onevision/pool" = "system"
  }
}

resource "google_container_node_pool" "system" {
  name     = "system"
  project  = var.project
  location = var.region
  cluster  = var.cluster_name

  initial_node_count = var.system_min_nodes

  autoscaling {
    min_node_count = var.system_min_nodes
    max_node_count = var.system_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.system_machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = 100
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = local.system_node_labels

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  lifecycle {
    # The cluster autoscaler owns the node count after creation.
    ignore_changes = [initial_node_count]
  }
}

resource "google_container_node_pool" "gpu" {
  name           = "gpu-${replace(var.gpu_type, "nvidia-", "")}"
  project        = var.project
  location       = var.region
  cluster        = var.cluster_name
  node_locations = length(var.gpu_node_locations) > 0 ? var.gpu_node_locations : null

  # Scale from zero: no GPU node (and no GPU bill) until a pod that tolerates the taint and
  # selects onevision/pool=gpu is pending; the cluster autoscaler builds the node template
  # (labels, taint, nvidia.com/gpu capacity) from this pool's configuration.
  initial_node_count = 0

  autoscaling {
    min_node_count  = 0
    max_node_count  = var.max_nodes
    location_policy = "ANY" # take whichever zone has H100 capacity right now
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    # GPU capacity is scarce: replace nodes in place instead of surging an extra 8-GPU node.
    max_surge       = 0
    max_unavailable = 1
  }

  node_config {
    machine_type = var.machine_type
    # The GPU operator's driver container (NVIDIA driver manager) supports Ubuntu with containerd on
    # GKE, not Container-Optimized OS.
    image_type      = "UBUNTU_CONTAINERD"
    disk_type       = "pd-ssd"
    disk_size_gb    = var.gpu_disk_size_gb
    spot            = var.gpu_spot
    service_account = var.node_service_account
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = local.gpu_node_labels

    guest_accelerator {
      type  = var.gpu_type
      count = var.gpu_count

      gpu_driver_installation_config {
        # INSTALLATION_DISABLED: GKE installs no NVIDIA driver; the NVIDIA GPU operator
        # (infra/gpu-operator/values.yaml, driver.enabled=true) installs and upgrades it. One owner
        # for driver, container toolkit, device plugin and DCGM keeps the GPU stack identical on
        # GKE, EKS and on-prem and lets us pin the driver branch with the operator chart; two
        # installers on one node would race over the kernel module.
        gpu_driver_version = "INSTALLATION_DISABLED"
      }
    }

    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

    dynamic "ephemeral_storage_local_ssd_config" {
      for_each = var.gpu_local_ssd_count > 0 ? [var.gpu_local_ssd_count] : []
      content {
        local_ssd_count = ephemeral_storage_local_ssd_config.value
      }
    }

    gvnic {
      enabled = true # required by A3 machine types
    }

    shielded_instance_config {
      # The operator builds the driver's kernel modules on the node; they are not signed with a key
      # Secure Boot trusts.
      enable_secure_boot          = false
      enable_integrity_monitoring = true
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}
