// Never compiled: written without the Android SDK (see android_demo/README.md).
pluginManagement {
    repositories { google(); mavenCentral(); gradlePluginPortal() }
}
dependencyResolutionManagement {
    repositories { google(); mavenCentral() }
}
rootProject.name = "mobile-export-android-demo"
include(":app")
