// Never compiled: written without the Android SDK (see android_demo/README.md).
plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "dev.mobileexport.demo"
    compileSdk = 35
    defaultConfig {
        applicationId = "dev.mobileexport.demo"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
        ndk { abiFilters += "arm64-v8a" }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    // .pte and .onnx files are memory-mapped: never compress bundles packed as assets
    androidResources { noCompress += listOf("pte", "onnx", "data", "json") }
}

dependencies {
    // ExecuTorch's Android library (Module for forward(), LlmModule for chat): the 1.x line that
    // reads the .pte files ExecuTorch 1.5 writes.
    implementation("org.pytorch:executorch-android:1.0.0")
    // ONNX Runtime GenAI's Android package (Model, Generator, Tokenizer) for ONNX bundles.
    implementation("com.microsoft.onnxruntime:onnxruntime-genai-android:0.8.3")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
    androidTestImplementation("androidx.test:runner:1.6.2")
    androidTestImplementation("androidx.test.ext:junit:1.2.1")
}
